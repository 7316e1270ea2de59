"""API keys: several per user, listed without secrets, revoked by prefix, last use recorded."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from control.cli import main
from shared.accounts.users import DISPLAY_PREFIX_LENGTH, hash_api_key
from shared.db import read_only, transaction
from shared.models import ApiKey, utcnow
from shared.settings import Settings
from tests.conftest import ApiUser

CREDITS = "/v1/get-user-credits"


def farm_cli(settings: Settings, *args: str) -> Result:
    """Run `kolors-farm ARGS` in this process against the test's database."""
    env = {
        "KOLORS_FARM_DATABASE_URL": settings.database_url or "",
        "KOLORS_FARM_DATA_DIR": str(settings.data_dir),
    }
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def new_key(settings: Settings, name: str) -> str:
    result = farm_cli(settings, "keys", "create", name)
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    assert key.startswith("kf_") and " " not in key
    return key


def answers(client: FlaskClient, key: str, bearer: bool = False) -> int:
    headers = {"Authorization": f"Bearer {key}"} if bearer else {"x-api-key": key}
    # Closed as a WSGI server closes it once sent: the key's last use is written then.
    with client.get(CREDITS, headers=headers) as response:
        return response.status_code


def last_used(sessions: sessionmaker[Session], key: str) -> object:
    with read_only(sessions) as session:
        return session.scalar(
            select(ApiKey.last_used_at).where(ApiKey.key_hash == hash_api_key(key))
        )


def test_a_user_holds_several_keys_and_a_revoked_one_is_refused_at_once(
    settings: Settings, client: FlaskClient, alice: ApiUser
) -> None:
    second = new_key(settings, "alice")
    third = new_key(settings, "alice")
    assert len({alice.key, second, third}) == 3
    assert [answers(client, k) for k in (alice.key, second, third)] == [200, 200, 200]
    assert answers(client, third, bearer=True) == 200

    listed = farm_cli(settings, "keys", "list", "alice")
    assert listed.exit_code == 0, listed.output
    as_json = farm_cli(settings, "keys", "list", "alice", "--json")
    rows = json.loads(as_json.output)["keys"]
    prefixes = [row["prefix"] for row in rows]
    assert prefixes == [k[:DISPLAY_PREFIX_LENGTH] for k in (alice.key, second, third)]
    assert all(row["revoked_at"] is None and row["created_at"] for row in rows)
    for output in (listed.output, as_json.output):
        for key in (alice.key, second, third):
            assert key[:DISPLAY_PREFIX_LENGTH] in output
            assert key not in output and key[DISPLAY_PREFIX_LENGTH:] not in output
            assert hash_api_key(key) not in output

    revoked = farm_cli(settings, "keys", "revoke", second[:DISPLAY_PREFIX_LENGTH])
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked API key {second[:DISPLAY_PREFIX_LENGTH]} of 'alice'" in revoked.output
    # The very next request with it is refused; the others go on working.
    assert answers(client, second) == 401
    assert answers(client, second, bearer=True) == 401
    assert answers(client, third) == 200 and answers(client, alice.key) == 200
    rows = json.loads(farm_cli(settings, "keys", "list", "alice", "--json").output)["keys"]
    assert [row["revoked_at"] is not None for row in rows] == [False, True, False]

    again = farm_cli(settings, "keys", "revoke", second[:DISPLAY_PREFIX_LENGTH])
    assert again.exit_code == 0 and "already revoked; nothing changed" in again.output
    assert answers(client, second) == 401


def test_revoke_refuses_unknown_and_ambiguous_prefixes(
    settings: Settings, sessions: sessionmaker[Session], client: FlaskClient, alice: ApiUser
) -> None:
    unknown = farm_cli(settings, "keys", "revoke", "kf_nothere")
    assert unknown.exit_code == 1
    assert "No API key with prefix 'kf_nothere'" in unknown.output
    assert "No API key" in farm_cli(settings, "keys", "revoke", "kf_").output

    # A new key's prefix is drawn again while taken, so a shared prefix comes only from
    # keys made elsewhere; the row below is one.
    prefix = alice.key[:DISPLAY_PREFIX_LENGTH]
    twin = prefix + "-another-key-with-the-same-display-prefix"
    with transaction(sessions) as session:
        session.add(
            ApiKey(user_id=alice.principal.user_id, key_hash=hash_api_key(twin), prefix=prefix)
        )
    ambiguous = farm_cli(settings, "keys", "revoke", prefix)
    assert ambiguous.exit_code == 1
    assert f"2 active API keys share the prefix {prefix!r}; nothing was revoked" in (
        ambiguous.output
    )
    assert alice.key not in ambiguous.output and twin not in ambiguous.output
    assert answers(client, alice.key) == 200 and answers(client, twin) == 200

    missing_user = farm_cli(settings, "keys", "create", "nobody")
    assert missing_user.exit_code == 1 and "No user named 'nobody'" in missing_user.output
    assert farm_cli(settings, "keys", "list", "nobody").exit_code == 1


def test_last_use_is_recorded_at_most_once_a_minute(
    settings: Settings, sessions: sessionmaker[Session], client: FlaskClient, alice: ApiUser
) -> None:
    assert last_used(sessions, alice.key) is None
    before = utcnow()
    assert answers(client, alice.key) == 200
    first = last_used(sessions, alice.key)
    assert isinstance(first, type(before)) and first >= before - timedelta(seconds=1)

    # Within the minute, requests leave it alone (authentication stays a read).
    assert answers(client, alice.key) == 200 and answers(client, alice.key, bearer=True) == 200
    assert last_used(sessions, alice.key) == first
    listed = json.loads(farm_cli(settings, "keys", "list", "alice", "--json").output)
    assert listed["keys"][0]["last_used_at"] == first.isoformat(timespec="seconds")

    # A minute later, the next request writes it again.
    long_ago = utcnow() - timedelta(minutes=2)
    with transaction(sessions) as session:
        session.execute(update(ApiKey).values(last_used_at=long_ago))
    assert answers(client, alice.key) == 200
    latest = last_used(sessions, alice.key)
    assert isinstance(latest, type(long_ago)) and latest > long_ago + timedelta(minutes=1)

    # A refused request records nothing.
    assert answers(client, alice.key + "x") == 401
    assert last_used(sessions, alice.key) == latest


@pytest.fixture
def frozen_api_keys(sessions: sessionmaker[Session], database_url: str) -> object:
    """A trigger refusing every UPDATE of api_keys: the last-use write fails in the database."""
    postgres = database_url.startswith("postgresql")
    with transaction(sessions) as session:
        if postgres:
            session.execute(
                text(
                    "CREATE FUNCTION refuse_key_update() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'api_keys is frozen'; END $$ LANGUAGE plpgsql"
                )
            )
            session.execute(
                text(
                    "CREATE TRIGGER frozen_api_keys BEFORE UPDATE ON api_keys "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_key_update()"
                )
            )
        else:
            session.execute(
                text(
                    "CREATE TRIGGER frozen_api_keys BEFORE UPDATE ON api_keys "
                    "BEGIN SELECT RAISE(ABORT, 'api_keys is frozen'); END"
                )
            )
    yield None
    with transaction(sessions) as session:
        # The PostgreSQL database is shared by the session's tests: leave it as it was.
        session.execute(text("DROP TRIGGER frozen_api_keys" + (" ON api_keys" if postgres else "")))
        if postgres:
            session.execute(text("DROP FUNCTION refuse_key_update()"))


def test_keys_never_reach_the_logs_even_when_recording_their_use_fails(
    settings: Settings,
    sessions: sessionmaker[Session],
    client: FlaskClient,
    alice: ApiUser,
    frozen_api_keys: object,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, SQL statements and parameters included
    second = new_key(settings, "alice")
    # The write of the last use fails, yet every request is answered.
    assert answers(client, alice.key) == 200
    assert answers(client, second, bearer=True) == 200
    assert last_used(sessions, alice.key) is None
    with client.post(
        "/v2/kolors",
        json={"prompt": "a fox", "width": 512, "height": 512, "steps": 500},
        headers=alice.headers,
    ) as submitted:
        assert submitted.status_code == 400
    assert answers(client, alice.key + "-wrong") == 401
    assert answers(client, "kf_" + "z" * 43, bearer=True) == 401
    failures = [r for r in caplog.records if "could not record the use of API key" in r.message]
    assert len(failures) >= 2 and all(r.levelno == logging.WARNING for r in failures)
    assert caplog.text  # the capture saw the requests' logging at all
    for key in (alice.key, second, alice.key + "-wrong", "kf_" + "z" * 43):
        assert key not in caplog.text
        assert key[DISPLAY_PREFIX_LENGTH:] not in caplog.text
