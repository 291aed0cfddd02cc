"""bench/: the quick CPU command runs end to end (tiny repeats: fields and the memory-growth
figure, not speed), and the full-size SDXL single-file factory writes what Easel's loader reads
(checked on tiny configs: same code path, megabytes instead of 6.9 GB)."""
import json

import pytest
import torch

from tests import factories


def test_quick_bench_prints_the_overhead_ratio_and_the_switching_memory_growth(tmp_path, capsys):
    from bench import quick

    out = tmp_path / "quick.json"
    quick.main(["--repeats", "1", "--switches", "20", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    overhead, switching = result["overhead"], result["switching"]
    assert overhead["model"] == "tinyworld" and overhead["steps"] == 2
    # the ratio comes from the unrounded times, so it agrees with the printed ones to rounding
    assert overhead["ratio"] == pytest.approx(overhead["easel_s"] / overhead["plain_s"], rel=2e-3) and overhead["ratio"] > 0
    assert overhead["same_timesteps"] is True  # both sides sample A1111's Euler timesteps
    assert overhead["max_prompt_embedding_diff"] < 1e-4
    # the flags say what the ratios say: with previews (as users run it) and without
    assert result["overhead_target_met"] == (overhead["ratio"] <= 1.03)
    assert result["overhead_target_met_without_previews"] == (overhead["ratio_no_preview"] <= 1.03)
    assert len(switching["rss_mb"]) == 2  # sampled every 10 switches
    assert switching["rss_growth_mb"] == round(switching["rss_mb"][-1] - switching["rss_mb"][0], 1)
    assert switching["disk_loads_during_switches"] == 0
    seconds = result["seconds"]
    assert set(seconds) == {"overhead", "switching", "total", "under_5_minutes"}
    assert seconds["under_5_minutes"] == (seconds["total"] < 300)


def test_full_size_sdxl_factory_writes_a_single_file_the_loader_reads(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from pipelines.configs import load_tokenizer
    from pipelines.probe import SDXL_BIGG_PREFIX, read_safetensors_header

    configs = factories.write_tiny_sdxl_checkpoint(tmp_path / "tiny-sdxl-configs", seed=0)
    # diffusers tells CLIP-L from bigG in a single file by width (768 vs 1280): widen the tiny
    # bigG too, or both text encoders would read CLIP-L's weights (only the configs are used)
    te2_config = configs / "text_encoder_2" / "config.json"
    te2_config.write_text(json.dumps({**json.loads(te2_config.read_text()), "hidden_size": 48}))
    path = factories.write_full_size_sdxl_checkpoint(tmp_path / "sdxl.safetensors", seed=5, arch_dir=configs)
    keys = read_safetensors_header(path).tensors
    assert any(k.startswith(SDXL_BIGG_PREFIX + "transformer.resblocks.") for k in keys)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("model.diffusion_model.label_emb.") for k in keys)  # size/crop conditioning
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                      tokenizer=load_tokenizer(),
                                                      tokenizer_2=load_tokenizer(pad_with_bang=True),
                                                      torch_dtype=torch.float16)
    for name, (offset, build) in factories.full_size_sdxl_builders(configs).items():
        expected = factories._materialise_fp16(build, 5 + offset).state_dict()
        loaded = getattr(pipe, name).state_dict()
        assert set(loaded) - {k for k in loaded if k.endswith("position_ids")} <= set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(loaded[key], tensor), f"{name}.{key}"


def test_gpu_throughput_rows_time_the_denoising_loop_on_their_own(monkeypatch):
    """bench/gpu_throughput.py's run() on CPU with tiny models standing in for the full-size
    ones (the --smoke path writes and loads 2 GB): every row has both rates, and the loop rate
    leaves out what happens before the first and after the last step."""
    from diffusers import StableDiffusionPipeline

    from bench import gpu_throughput
    from pipelines.configs import load_tokenizer

    def tiny_plain_pipe(_model, device, dtype):
        parts = factories.tiny_components(0)
        pipe = StableDiffusionPipeline(**parts, tokenizer=load_tokenizer(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device, dtype)

    monkeypatch.setattr(gpu_throughput, "_plain_pipe", tiny_plain_pipe)
    monkeypatch.setattr(gpu_throughput, "write_checkpoint", lambda _model, path: factories.write_tiny_checkpoint(path))
    rows = gpu_throughput.run(["sd15"], [1], 3, smoke_size=64)
    assert [r["config"] for r in rows] == ["plain diffusers fp16+SDPA", "Easel default", "Easel fast"]
    for row in rows:
        assert row["unet_it_s"] > 0 and row["it_s"] > 0 and isinstance(row["outside_loop_s"], float)
        assert row["peak_vram_gb"] is None  # CPU
    timer = gpu_throughput.StepTimer()
    timer.progress(gpu_throughput_progress(step=0))  # a compile note at step 0 is not a step
    assert timer.marks == [] and timer.loop_seconds_per_step() is None
    for step in (1, 2, 3):
        timer.progress(gpu_throughput_progress(step=step))
    assert timer.step_end(None, 3, None, {}) == {} and len(timer.marks) == 4
    assert timer.loop_seconds_per_step() == (timer.marks[-1] - timer.marks[0]) / 3


def gpu_throughput_progress(step):
    from pipelines.jobs import Progress
    return Progress(step=step, total_steps=3, batch_index=0, batch_count=1)


def test_lora_switch_bench_on_tinyworld_reports_its_ratio_and_no_reload():
    """bench/lora_switch.py's run() on the built-in checkpoint with tiny repeats: the fields, the
    ratio against the record's own times, and the load counts (not the speed)."""
    from bench import lora_switch

    switches = 4
    result = lora_switch.run(lora_switch.BUILTIN, switches=switches, size=64, steps=1,
                             device=torch.device("cpu"), dtype=torch.float32)
    assert result["checkpoint"] == "tinyworld.safetensors" and result["switches"] == switches
    assert result["checkpoint_bytes"] == lora_switch.BUILTIN.stat().st_size
    cold, switch = result["cold_load_s"], result["switch_s"]
    assert cold > 0 and switch > 0 and result["ratio_cold_load_to_switch"] > 0
    # the ratio is from unrounded times: bound it by the 4-decimal times and its own 1 decimal
    low, high = (cold - 5e-5) / (switch + 5e-5) - 0.05, (cold + 5e-5) / max(switch - 5e-5, 1e-9) + 0.05
    assert low <= result["ratio_cold_load_to_switch"] <= high
    select = result["adapter_select_s"]
    assert (cold - 5e-5) / (select + 5e-6) - 0.05 <= result["ratio_cold_load_to_adapter_select"] \
        <= (cold + 5e-5) / max(select - 5e-6, 1e-9) + 0.05
    # the final manager loaded the checkpoint once: no switch or generation reloaded it
    assert result["checkpoint_loads"] == 1 and result["checkpoint_loads_during_switches"] == 0
    assert result["generation"]["size"] == 64 and result["generation"]["steps"] == 1
    assert all(result["generation"][k] > 0 for k in ("no_lora_s", "lora_applied_s", "lora_fused_s"))
