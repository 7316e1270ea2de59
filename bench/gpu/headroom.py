"""How close the random full-size Kolors comes to fp16's range, checked on a CPU.

    python bench/gpu/headroom.py [--tokens 64] [--size 256]

Builds each full-size component from kolors-config/ on the CPU, one at a time (the
text encoder in bf16, 12.5 GB, which has fp32's exponent range; the UNet and the VAE in
fp32, which a CPU runs much faster),
initialised exactly as bench.py initialises it on a GPU, runs it once on a short
input and prints the largest magnitude any module outputs. Below fp16's largest value
(65504) with a wide margin, the fp16 runs of bench.py stay finite; a magnitude does
not grow with the image size or the prompt length. Takes a few minutes and about
16 GB of memory; nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

import model  # noqa: E402

FP16_MAX = 65504.0


class Peaks:
    """The largest |value| each module outputs, through forward hooks."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.peaks: dict[str, float] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name)) for name, module in root.named_modules()
        ]

    def _hook(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            tensors = output if isinstance(output, tuple | list) else (output,)
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    value = float(tensor.detach().abs().max())
                    self.peaks[name] = max(self.peaks.get(name, 0.0), value)

        return hook

    def report(self, what: str, seconds: float) -> float:
        """Print the top modules and return the overall peak."""
        for handle in self.handles:
            handle.remove()
        top = sorted(self.peaks.items(), key=lambda item: -item[1])[:5]
        peak = top[0][1] if top else 0.0
        print(f"{what}: peak |output| {peak:.4g} ({peak / FP16_MAX:.2%} of fp16's range), "
              f"{seconds:.0f} s")  # fmt: skip
        for name, value in top:
            print(f"    {value:12.4g}  {name or '(the model)'}")
        return peak


@torch.inference_mode()
def main() -> int:
    """Check each component; exit 1 if any output comes within 10x of fp16's range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--components", default="text_encoder,unet,vae")
    args = parser.parse_args()
    config, device = model.CONFIGS["full"], torch.device("cpu")
    wanted = set(args.components.split(","))
    latent = args.size // 8
    torch.manual_seed(model.SEED)
    peaks: dict[str, float] = {}

    # Unit-variance stand-ins for the text encoder's outputs when it is not run.
    hidden = torch.randn(1, args.tokens, 4096)
    pooled = torch.randn(1, 4096)
    if "text_encoder" in wanted:
        started = time.perf_counter()
        encoder = model.make_text_encoder(config, device, torch.bfloat16)
        model.init_text_encoder(encoder)
        model.check_finite(encoder, "text encoder")
        watch = Peaks(encoder)
        tokenizer = model.load_tokenizer(Path(tempfile.mkdtemp(prefix="kolors-headroom-")))
        ids = tokenizer(["a red fox in the snow"], padding="max_length", max_length=args.tokens,
                        truncation=True, return_tensors="pt")  # fmt: skip
        out = encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                      position_ids=ids["position_ids"], output_hidden_states=True)  # fmt: skip
        # What the pipeline feeds the UNet: the penultimate layer, and the last at the end.
        hidden = out.hidden_states[-2].permute(1, 0, 2).float()
        pooled = out.hidden_states[-1][-1, :, :].float()
        peaks["text encoder"] = watch.report("text encoder", time.perf_counter() - started)
        del encoder, watch, out
        gc.collect()

    if "unet" in wanted:
        started = time.perf_counter()
        unet = model.make_unet(config, device, torch.float32)
        watch = Peaks(unet)
        time_ids = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2).float()
        noise_pred = unet(
            torch.randn(2, 4, latent, latent),
            torch.tensor(999),
            encoder_hidden_states=hidden.repeat(2, 1, 1),
            added_cond_kwargs={"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids},
        ).sample
        print(f"unet: noise prediction std {float(noise_pred.std()):.3g}")
        peaks["unet"] = watch.report("unet", time.perf_counter() - started)
        del unet, watch
        gc.collect()

    if "vae" in wanted:
        started = time.perf_counter()
        vae = model.make_vae(config, device, torch.float32)
        watch = Peaks(vae)
        vae.decode(torch.randn(1, 4, latent, latent) / 0.13025)
        peaks["vae"] = watch.report("vae decode", time.perf_counter() - started)

    worst = max(peaks.values())
    print(f"worst {worst:.4g}: {'fits' if worst < FP16_MAX / 10 else 'TOO CLOSE to'} fp16")
    return 0 if worst < FP16_MAX / 10 else 1


if __name__ == "__main__":
    sys.exit(main())
