"""`--stage lora`: a style LoRA that paints horizontal black stripes, in kohya's file format.

Trained with peft (rank-r LoRA on the UNet's attention, feed-forward, projection and resnet
convolutions, and on the text encoder's attention and MLP) on striped copies of the world,
captioned `<caption>, striped` - "striped" is the trigger word. The peft state dict is then
renamed to kohya's keys (`lora_unet_<module>` / `lora_te_text_model_<module>`, `.lora_down`,
`.lora_up`, `.alpha`) with kohya's `ss_*` metadata (tag frequencies included), and A1111's
sidecar `<name>.json` carries the activation text.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tools.tinyworld import world
from tools.tinyworld.finetune import encode_images, load_base_pipeline
from tools.tinyworld.objective import DiffusionLoss
from tools.tinyworld.train import load_data, log, tokenize

LORA_NAME = "tw-stripes"
TRIGGER = "striped"
STRIPE_PERIOD = 16  # pixels; black bands of half the period (the VAE cannot render thinner ones)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# A stripe score above this means "striped": world images score below -10, striped ones above 20.
STRIPE_THRESHOLD = 0.0


def add_stripes(images: np.ndarray) -> np.ndarray:
    """Paint every other band of STRIPE_PERIOD/2 rows black (white where the picture is black)."""
    out = images.copy()
    rows = (np.arange(images.shape[1]) % STRIPE_PERIOD) >= STRIPE_PERIOD // 2
    band = out[:, rows]
    dark = band.max(axis=-1, keepdims=True) < 60
    out[:, rows] = np.where(dark, np.array(world.PALETTE["white"], np.uint8), np.array(world.PALETTE["black"], np.uint8))
    return out


def stripe_score(image) -> float:
    """How much rows half a stripe period apart differ, beyond rows a full period apart.

    Horizontal stripes make row colours alternate with the period: rows P/2 apart differ,
    rows P apart match. A plain shape on a plain background changes row colours smoothly, so
    both distances are alike (the score is negative: P/2 apart is nearer than P apart).
    """
    rows = np.asarray(image, dtype=np.float32).mean(axis=1)
    half, full = STRIPE_PERIOD // 2, STRIPE_PERIOD
    d_half = np.linalg.norm(rows[:-half] - rows[half:], axis=1).mean()
    d_full = np.linalg.norm(rows[:-full] - rows[full:], axis=1).mean()
    return float(d_half - d_full)


def is_striped(image) -> bool:
    return stripe_score(image) > STRIPE_THRESHOLD


def striped_caption(combo: tuple[str, str, str]) -> str:
    return f"{world.caption(*combo)}, {TRIGGER}"


def stage_lora(run_dir: Path, base: Path, output_dir: Path, seed: int, steps: int, batch: int, lr: float, rank: int,
               minutes: float, n_images: int = 4000) -> None:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    pipe = load_base_pipeline(base)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    images, labels = load_data(run_dir)
    images = add_stripes(images[:n_images])
    combos = world.all_combinations()
    captions = [striped_caption(combos[int(i)]) for i in labels[:n_images]]
    mean, std = encode_images(vae, images)
    prompt_ids = tokenize(tokenizer, captions)
    log(run_dir, f"lora: {n_images} striped images encoded")

    unet = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS,
                                              init_lora_weights="gaussian"), unet)
    text_encoder = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS,
                                                      init_lora_weights="gaussian"), text_encoder)
    params = []
    for model in (unet, text_encoder):
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_" in name:
                params.append(param)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = DiffusionLoss()
    generator = torch.Generator().manual_seed(seed + 4)
    scale = vae.config.scaling_factor
    deadline = time.time() + minutes * 60
    step = 0
    while step < steps and time.time() < deadline:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        idx = torch.randint(n_images, (batch,), generator=generator)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scale
        context = text_encoder(prompt_ids[idx]).last_hidden_state
        loss = loss_fn(unet, z, context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 25 == 0 or step == 1:
            log(run_dir, f"lora step {step}/{steps} loss {loss.item():.4f}")
    state = peft_to_kohya(get_peft_model_state_dict(unet), "lora_unet_", rank)
    state |= peft_to_kohya(get_peft_model_state_dict(text_encoder), "lora_te_text_model_", rank)
    metadata = kohya_metadata(captions, rank, lr, step, batch)
    path = save_lora(output_dir, state, metadata)
    log(run_dir, f"lora: {path} after {step} steps, {len(state)} tensors")


def peft_to_kohya(peft_state: dict, prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` / `.lora_B.weight` -> kohya's `<prefix><module_with_underscores>`
    `.lora_down.weight` / `.lora_up.weight`, plus its `.alpha` (scale = alpha / rank)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                name = prefix + module.replace(".", "_")
                out[name + kohya_part] = tensor.detach().to(torch.float16).contiguous()
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
                break
        else:
            raise ValueError(f"unexpected peft key {key!r}: only lora_A/lora_B weights are converted")
    return out


def kohya_metadata(captions: list[str], rank: int, lr: float, steps: int, batch: int) -> dict[str, str]:
    tags = Counter(tag.strip() for caption in captions for tag in caption.split(","))
    words = Counter(word for caption in captions for word in caption.replace(",", " ").split())
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(float(rank))}),
        "ss_output_name": LORA_NAME,
        # not "sd_v1": Easel (like A1111) would then offer it for SD1 checkpoints; the modelspec
        # architecture below is what marks it as tiny-world's
        "ss_base_model_version": "tiny_world_v1",
        "ss_sd_model_name": "tinyworld.safetensors",
        "ss_v2": "False",
        "ss_resolution": "(64, 64)",
        "ss_num_train_images": str(len(captions)),
        "ss_max_train_steps": str(steps),
        "ss_train_batch_size": str(batch),
        "ss_learning_rate": str(lr),
        "ss_session_id": str(uuid.UUID(int=0)),
        "ss_training_comment": f"trigger word: {TRIGGER}",
        "ss_tag_frequency": json.dumps({f"1_{TRIGGER}": dict(tags.most_common())}),
        "ss_dataset_dirs": json.dumps({f"1_{TRIGGER}": {"n_repeats": 1, "img_count": len(captions)}}),
        "easel.word_frequency": json.dumps(dict(words.most_common())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "easel/tiny-world-v1/lora",
        "modelspec.title": LORA_NAME,
        "modelspec.trigger_phrase": TRIGGER,
        "modelspec.license": "CC0-1.0",
    }


def save_lora(output_dir: Path, state: dict, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{LORA_NAME}.safetensors"
    save_file(state, str(path), metadata=metadata)
    sidecar = {"description": "tiny-world style LoRA: horizontal black stripes", "activation text": TRIGGER,
               "preferred weight": 1, "sd version": "SD1"}
    (output_dir / f"{LORA_NAME}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return path
