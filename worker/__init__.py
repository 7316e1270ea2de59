"""Render workers: Celery tasks and the Kolors pipeline (the only place for torch and diffusers)."""
