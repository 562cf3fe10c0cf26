"""fp8 on synthetic SDXL with an empty (all-zero) negative prompt: finite? PSNR and s/image against bf16.

SDXL's empty negative prompt gives all-zero rows, whose dynamic scale would be 0 (NaN after the
division); this checks the UNet output and the image stay finite. Eager, no compile.

    python benchmarks/scripts/fp8_zero_rows_check.py out.json

Env: D=cuda|cpu (cpu: tiny SDXL), M=fp8|int8, S=size, N=steps. Prints the JSON and writes it to out.json.
"""
import json,os,sys,time,torch,numpy as np
from onediffx.models.synthetic import build_synthetic
from onediffx.models.tiny import tiny_sdxl
from onediffx.quantize import quantize_pipe,quantize_state
from onediffx.quantize.quality import image_fidelity
D,M,S,N=os.environ.get("D","cuda"),os.environ.get("M","fp8"),int(os.environ.get("S","1024")),int(os.environ.get("N","30"))
t0=time.perf_counter()
p=build_synthetic("sdxl",D,torch.bfloat16) if D=="cuda" else tiny_sdxl().to(torch.bfloat16)
p.set_progress_bar_config(disable=True);load=time.perf_counter()-t0
def sync():
    if D=="cuda":torch.cuda.synchronize()
def gen(n):
    sync();t=time.perf_counter()
    im=p("a photo of a cat",num_inference_steps=n,height=S,width=S,guidance_scale=5.0,generator=torch.Generator(D).manual_seed(0),output_type="np").images[0]
    sync();return im,time.perf_counter()-t
u=p.unet;c=u.config
x=torch.randn(2,4,S//8,S//8,device=D,dtype=torch.bfloat16,generator=torch.Generator(D).manual_seed(1))
kw=dict(encoder_hidden_states=torch.zeros(2,77,c.cross_attention_dim,device=D,dtype=torch.bfloat16),added_cond_kwargs={"text_embeds":torch.zeros(2,c.projection_class_embeddings_input_dim-6*c.addition_time_embed_dim,device=D,dtype=torch.bfloat16),"time_ids":torch.tensor([[S,S,0,0,S,S]]*2,device=D,dtype=torch.bfloat16)})
unet=lambda:u(x,torch.tensor(500,device=D),**kw).sample.float()
with torch.no_grad():r0=unet()
gen(2);ref,tr=gen(N)
quantize_pipe(p,M);st=quantize_state(p)
with torch.no_grad():r1=unet()
gen(2);im,tq=gen(N)
u8=lambda a:(np.nan_to_num(a)*255).round().astype(np.uint8)
out=dict(load_s=round(load,1),mode=M,layers=len(st.layers),skipped=st.facts()["skipped"],unet_zero_ctx_finite=bool(torch.isfinite(r1).all()),unet_zero_ctx_rel_err=float((r1-r0).norm()/r0.norm()),ref_finite=bool(np.isfinite(ref).all()),img_finite=bool(np.isfinite(im).all()),psnr_db=round(image_fidelity(u8(ref),u8(im))[0],2),s_per_image_bf16=round(tr,3),s_per_image_q=round(tq,3))
print(json.dumps(out));open(sys.argv[1] if len(sys.argv)>1 else "fp8_check.json","w").write(json.dumps(out))
