"""A tiny random-weight Kolors checkpoint, built offline, for tests and CPU-only hosts."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

import sentencepiece as spm
import torch

# Defining modules, not the `diffusers` top level: to mypy that level is the dummy placeholders.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel, RMSNorm
from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler

SEED = 20240706

_PADDED_VOCAB = 1024
# An upper bound: the small corpus stops training early (about 660 pieces), which still leaves
# room for byte fallback's 256 pieces and every character of the corpus.
_SP_VOCAB = 900
_TEXT_HIDDEN = 32
_TIME_EMBED = 8

# Prompt-like text in both languages Kolors is used with, Chinese with its own full-width
# punctuation. Trained from memory, not from a file: a file path would be recorded in the model
# proto and builds would stop being byte-identical.
_CORPUS = """\
a photo of a red fox sitting in the snow, soft morning light, highly detailed
an oil painting of a lighthouse on a rocky coast at sunset, dramatic clouds
a cup of green tea on a wooden table, steam rising, shallow depth of field
portrait of an old fisherman with a white beard, black and white photography
a futuristic city at night with neon signs and flying cars, cinematic
a watercolor illustration of cherry blossoms along a quiet river
a small cabin in a pine forest, mist, autumn leaves, warm colors
a bowl of noodles with chili oil and spring onions, food photography
an astronaut riding a horse on the moon, digital art, trending on artstation
a cat wearing a tiny hat, studio lighting, 85mm lens
a traditional chinese garden with a stone bridge and koi pond
a mountain landscape in the style of ink wash painting
a girl holding an umbrella in the rain, street photography, reflections
a vintage car parked in front of a diner, 1950s, kodachrome
a dragon made of clouds flying over the great wall
close-up of a dew drop on a leaf, macro photography
the quick brown fox jumps over the lazy dog 0123456789
simple, minimal, flat design icon of a rocket, blue and orange
一只红色的狐狸坐在雪地里，柔和的晨光，细节丰富
夕阳下岩石海岸上的灯塔，油画，云彩壮观
木桌上的一杯绿茶，热气升腾，浅景深
白胡子老渔夫的肖像，黑白摄影
夜晚的未来城市，霓虹灯和飞行汽车，电影感
水彩插画，安静的河边盛开的樱花
松林中的小木屋，薄雾，秋叶，暖色调
一碗红油面条配葱花，美食摄影
宇航员在月球上骑马，数字艺术
戴着小帽子的猫，影棚灯光，八十五毫米镜头
中国传统园林，石桥和锦鲤池
水墨画风格的山水风景
雨中撑伞的女孩，街头摄影，倒影
停在餐馆前的老爷车，复古胶片
云朵化成的龙飞过长城
树叶上的一滴露珠，微距摄影
简约扁平风格的火箭图标，蓝色和橙色
春天的花园里开满了红色、黄色和紫色的花朵
一个穿着汉服的少女站在古老的寺庙前，高清，大师作品
秋天的银杏树下，金黄的落叶铺满小路
熊猫在竹林里吃竹子，可爱，自然光
江南水乡的清晨，小船，石板路，烟雨
"""  # noqa: RUF001


def _sentences() -> Iterator[str]:
    yield from (line for line in _CORPUS.splitlines() if line)


def _train_sentencepiece() -> bytes:
    """Train a small byte-fallback SentencePiece model from the embedded corpus."""
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(),
            model_writer=model,
            logstream=quiet,
            model_type="unigram",
            vocab_size=_SP_VOCAB,
            # The corpus is too small to fill the vocabulary with learned pieces; let it stop early.
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            # One thread keeps piece scores, and so the file, the same on every build.
            num_threads=1,
            shuffle_input_sentence=False,
        )
    return model.getvalue()


def _init_text_encoder(model: ChatGLMModel) -> None:
    """Give every tensor a defined value; ChatGLMModel allocates its weights uninitialised."""
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            done.add(id(module.weight))
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
                done.add(id(module.bias))
        elif isinstance(module, torch.nn.Embedding):
            # Unit variance: with 0.02 the prompt barely moves the image.
            torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)
            done.add(id(module.weight))
        elif isinstance(module, RMSNorm):
            # RMSNorm allocates its weight with torch.empty, even outside skip_init.
            torch.nn.init.ones_(module.weight)
            done.add(id(module.weight))
    missed = [name for name, param in model.named_parameters() if id(param) not in done]
    if missed:
        raise RuntimeError(f"tiny text encoder: no initialiser for {missed}")
    _check_finite(model, "text encoder")


def _check_finite(model: torch.nn.Module, what: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RuntimeError(f"tiny {what}: {name} is not finite")


def _text_encoder() -> ChatGLMModel:
    config = ChatGLMConfig(  # type: ignore[no-untyped-call]
        num_layers=2,
        padded_vocab_size=_PADDED_VOCAB,
        hidden_size=_TEXT_HIDDEN,
        ffn_hidden_size=64,
        kv_channels=16,
        num_attention_heads=2,
        # The rotary cache is indexed by position and the pipeline always feeds 256 tokens.
        seq_length=256,
        multi_query_attention=True,
        multi_query_group_num=1,
        add_qkv_bias=True,
        add_bias_linear=False,
        rmsnorm=True,
        post_layer_norm=True,
        layernorm_epsilon=1e-5,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        # ChatGLMConfig has no such default but ChatGLMModel reads it.
        original_rope=True,
    )
    model = ChatGLMModel(config)
    _init_text_encoder(model)
    return model


def _unet() -> UNet2DConditionModel:
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 32, 32),
        # Attention only where the latent is smallest: it is what keeps 1024 px fast on a CPU.
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=4,
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=32,
        encoder_hid_dim=_TEXT_HIDDEN,
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        # Six size/crop ids, each embedded to addition_time_embed_dim, plus the pooled text vector.
        projection_class_embeddings_input_dim=6 * _TIME_EMBED + _TEXT_HIDDEN,
    )
    _check_finite(unet, "unet")
    return unet


def _vae() -> AutoencoderKL:
    # Four levels like the real VAE, so latents are 1/8 of the image and the UNet stays cheap.
    vae: AutoencoderKL = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        mid_block_add_attention=False,
    )
    _check_finite(vae, "vae")
    return vae


def _scheduler() -> EulerDiscreteScheduler:
    scheduler: EulerDiscreteScheduler = EulerDiscreteScheduler(
        num_train_timesteps=1100,
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return scheduler


def _write_checkpoint(out: pathlib.Path) -> None:
    """Write every file of the checkpoint into the existing, empty folder `out`."""
    with tempfile.TemporaryDirectory(prefix="kolors-tiny-sp-") as scratch:
        # ChatGLMTokenizer only loads from a path; keep that file out of `out` so saving the
        # tokenizer never reads and rewrites the same file.
        sp_path = pathlib.Path(scratch) / "tokenizer.model"
        sp_path.write_bytes(_train_sentencepiece())
        tokenizer = ChatGLMTokenizer(vocab_file=str(sp_path))  # type: ignore[no-untyped-call]
        # ChatGLM appends nine special ids ([MASK] .. <|observation|>) after the SentencePiece
        # ids, and the embedding table must have a row for every one of them.
        if tokenizer.vocab_size > _PADDED_VOCAB:
            raise RuntimeError(
                f"tiny tokenizer: {tokenizer.vocab_size} ids do not fit in {_PADDED_VOCAB}"
            )
        # Fork so building does not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            text_encoder = _text_encoder()
            torch.manual_seed(SEED + 1)
            unet = _unet()
            torch.manual_seed(SEED + 2)
            vae = _vae()
        # diffusers annotates `scheduler` with the KarrasDiffusionSchedulers enum and the optional
        # components as required; the values below are what from_pretrained itself passes.
        pipe = KolorsPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),  # type: ignore[arg-type]
            image_encoder=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            force_zeros_for_empty_prompt=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)


def _publishable(tree: pathlib.Path) -> None:
    """Make the tree world-readable and flush it to disk before it is renamed into place."""
    for dirpath, _dirnames, filenames in os.walk(tree):
        # mkdtemp makes 0700 folders and safetensors writes 0600 files; workers may run as
        # another user.
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)  # noqa: S103
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            os.chmod(path, os.stat(path).st_mode | 0o444)
            _fsync(path)
    for dirpath, _dirnames, _filenames in os.walk(tree, topdown=False):
        _fsync(dirpath)


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_checkpoint(directory: pathlib.Path) -> bool:
    return (directory / "model_index.json").is_file()


def _build_sibling(directory: pathlib.Path) -> pathlib.Path:
    """Build a complete checkpoint in a fresh hidden folder next to `directory`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per build, on the same file system, so rename is atomic and racers never
    # share a half-written folder.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _write_checkpoint(tmp)
        _publishable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _rename_into_place(tmp: pathlib.Path, directory: pathlib.Path) -> bool:
    """Rename `tmp` to `directory`; False where a non-empty `directory` is already there."""
    try:
        # Replaces an empty folder atomically; refuses a non-empty one.
        os.rename(tmp, directory)
    except OSError:
        if directory.is_dir() and any(directory.iterdir()):
            return False
        raise
    with contextlib.suppress(OSError):
        _fsync(directory.parent)
    return True


def _publish(tmp: pathlib.Path, directory: pathlib.Path, *, replace: bool) -> pathlib.Path:
    """Move a finished build to `directory`, or discard it where a checkpoint won the race."""
    try:
        if _rename_into_place(tmp, directory):
            return directory
        if _is_checkpoint(directory) and not replace:
            return directory
        if not _is_checkpoint(directory):
            # Never delete a folder we did not write: it may hold someone's files.
            raise FileExistsError(f"{directory} exists, is not empty and is not a checkpoint")
        # Move the old checkpoint aside first: the path is briefly absent, never half-written.
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        with contextlib.suppress(FileNotFoundError):
            os.rename(directory, old / "checkpoint")
        try:
            if not _rename_into_place(tmp, directory) and not _is_checkpoint(directory):
                raise FileExistsError(f"{directory} was replaced by something else meanwhile")
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return directory
    finally:
        # Whatever happened, our copy is either in place (gone from tmp) or not wanted.
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_checkpoint(directory: pathlib.Path) -> pathlib.Path:
    """Write a tiny random-weight Kolors checkpoint, in diffusers' folder layout, to `directory`."""
    directory = pathlib.Path(directory)
    return _publish(_build_sibling(directory), directory, replace=True)


def ensure_tiny_checkpoint(directory: pathlib.Path) -> pathlib.Path:
    """Build the tiny checkpoint at `directory` unless one is already there."""
    directory = pathlib.Path(directory)
    if _is_checkpoint(directory):
        return directory
    return _publish(_build_sibling(directory), directory, replace=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the tiny checkpoint into the folder named on the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m worker.tiny DIR", file=sys.stderr)
        return 2
    print(build_tiny_checkpoint(pathlib.Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
