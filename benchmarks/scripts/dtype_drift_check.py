"""How far does the synthetic SDXL image move with the dtype alone? fp32 against bf16, unquantized, same seed (CPU).

Separates fp8's own error from the dtype's: the quantize bench compares fp8 (which runs in bfloat16)
with unquantized bfloat16 for that reason.

    python benchmarks/scripts/dtype_drift_check.py SIZE STEPS   # 128 30: results/2026-12-02-cpu/dtype-drift.json
"""
import json, sys, time, torch, numpy as np
from onediffx.models.synthetic import build_synthetic
from onediffx.quantize.quality import image_fidelity
torch.set_num_threads(2)
S, N = int(sys.argv[1]), int(sys.argv[2])
out = {}
def gen(p):
    p.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    im = p("a photo of an astronaut riding a horse on the moon", num_inference_steps=N, height=S, width=S,
           guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    return (np.nan_to_num(im) * 255).round().astype(np.uint8), time.perf_counter() - t
imgs = {}
for dt in ("float32", "bfloat16"):
    t = time.perf_counter()
    p = build_synthetic("sdxl", "cpu", getattr(torch, dt))
    if dt == "float16":
        p.vae.to(torch.float32)  # CPU fp16 VAE: avoid overflow noise in the decoder; UNet stays fp16
    imgs[dt], s = gen(p)
    out[dt] = dict(build_s=round(time.perf_counter() - t - s, 1), gen_s=round(s, 1), std=float(imgs[dt].std()))
    print(dt, out[dt], flush=True)
    del p
for a, b in (("float32", "bfloat16"),):
    psnr, ssim = image_fidelity(imgs[a], imgs[b])
    out[f"{a}_vs_{b}"] = dict(psnr=round(psnr, 2), ssim=None if ssim is None else round(ssim, 4))
print(json.dumps(out), flush=True)
