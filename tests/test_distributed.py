"""Two CPU processes over gloo train exactly like one process on the same global batch.

Plain DDP and DeepSpeed ZeRO-2/ZeRO-3 (DeepSpeed's CPU accelerator) run here; ZeRO-3 also resumes from its sharded
checkpoint, runs the ScatterMoE experts on its gathered weights and compiles its layers. accelerate applies FSDP
only on GPUs, so FSDP's runs are in benchmarks/distributed.py; here `--fsdp` must refuse the CPU. The features
under the engines (packing, LoRA, FP8) are in test_distributed_features.py.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_runs import STEPS, ZERO2, ZERO3, assert_same_losses, logged, train, train_and_log
from monkey_patch import preflight
from turbo_tune.arguments import parse_config
from turbo_tune.errors import ConfigError


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, checkpoint) -> tuple[Path, dict[int, float]]:
    output_dir = tmp_path_factory.mktemp("single") / "out"
    return output_dir, train(output_dir, 1, checkpoint)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, checkpoint) -> tuple[Path, dict[int, float]]:
    output_dir = tmp_path_factory.mktemp("zero3") / "out"
    return output_dir, train(output_dir, 2, checkpoint, *ZERO3)


@pytest.mark.parametrize("engine", [[], ZERO2], ids=["ddp", "zero2"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, checkpoint, single_process, engine):
    assert_same_losses(train(tmp_path / "out", 2, checkpoint, *engine), single_process[1])
    # the expert-load counts are summed over both processes: the same tokens as one process routes
    expected = logged(single_process[0], "moe_load_max_over_mean")
    assert logged(tmp_path / "out", "moe_load_max_over_mean") == pytest.approx(expected, rel=0.02)


def test_zero3_matches_one_process_evaluates_like_it_and_saves_one_consolidated_model(single_process, zero3_run):
    (single_dir, expected), (zero3_dir, losses) = single_process, zero3_run
    assert_same_losses(losses, expected)
    single_eval = logged(single_dir, "eval_loss")  # the held-out examples, scored at each save
    assert list(single_eval) == [STEPS // 2, STEPS]
    assert logged(zero3_dir, "eval_loss") == pytest.approx(single_eval, rel=1e-4)
    assert (zero3_dir / f"checkpoint-{STEPS // 2}" / f"global_step{STEPS // 2}").is_dir()  # sharded engine state
    consolidated, reference = load_file(zero3_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    assert consolidated.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(consolidated[name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_zero3_runs_the_scattermoe_experts_on_the_gathered_weights(tmp_path, checkpoint, single_process):
    """The Triton experts (CPU interpreter) read each MoE block's weights after ZeRO-3 gathers them; two steps,
    so the second loss also checks the gradients that reached the experts."""
    losses = train(tmp_path / "out", 2, checkpoint, *ZERO3, "--use_fast_moe_block", "--max_steps", "2")
    assert_same_losses(losses, single_process[1], steps=2)


def test_zero3_compiled_layers_train_like_eager_ones(tmp_path, checkpoint, zero3_run):
    """--torch_compile under ZeRO-3: the layers compile with DeepSpeed's gather hooks around them, no fallback; the
    log says what DeepSpeed's hooks cost the compiled graphs. Dynamo and AOTAutograd meet the hooks; inductor's CPU
    code generation would only add minutes of C++ compiles for each recompile the hooks cause, so aot_eager here."""
    losses, log = train_and_log(tmp_path / "out", 2, checkpoint, *ZERO3, "--torch_compile", "--torch_compile_backend",
                                "aot_eager", "--max_steps", "2")
    assert "torch.compile (aot_eager) on each of the 2 decoder layers" in log
    assert "continuing uncompiled" not in log
    assert "--torch_compile under ZeRO-3 trains correctly but gains little" in log
    assert_same_losses(losses, zero3_run[1], rel=1e-3, steps=2)


def test_zero3_resume_from_sharded_state_continues_the_losses(tmp_path, checkpoint, zero3_run):
    first, expected = zero3_run
    resumed = train(tmp_path / "resumed", 2, checkpoint, *ZERO3,
                    "--resume_from_checkpoint", str(first / f"checkpoint-{STEPS // 2}"))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_fsdp_refuses_the_cpu_instead_of_training_unsharded(tmp_path):
    config = parse_config(["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--fsdp"])
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs FSDP")
    with pytest.raises(ConfigError, match="--fsdp needs CUDA GPUs"):
        preflight(config)
