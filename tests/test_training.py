"""Real short runs of the embedded tiny Qwen3-MoE on the CPU, through the same entry point users call."""

import json
import math
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen3_sft
from distributed_runs import interrupt, logged, start
from monkey_patch import sft_trainer
from turbo_tune.checkpoints import FINAL_STAGING_DIR

STEPS = 40
EVAL = ("--eval_split", "0.05")  # 20 of the 400 examples, evaluated at each save (steps 20 and 40)


def run_flags(output_dir: Path, *flags: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--bundled_examples", "400", "--max_steps", str(STEPS),
        "--logging_steps", "1", "--save_steps", str(STEPS // 2), "--gradient_checkpointing", "false", *flags,
    ]


def run(output_dir: Path, *flags: str) -> int:
    return qwen3_sft.main(run_flags(output_dir, *flags))


def losses(output_dir: Path, checkpoint: str | None = None) -> dict[int, float]:
    return logged(output_dir / (checkpoint or ""), "loss")


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One full run with MLflow logging into a private store; several tests read what it left."""
    root = tmp_path_factory.mktemp("run")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", "turbo-tune-test")
        # MLflow samples system metrics every 10 s by default; the run can finish sooner on a fast machine
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
        assert run(root / "out", "--use_liger_efficiency_callback", "--report_to", "mlflow", *EVAL) == 0
    return root / "out", tracking_uri


def test_loss_falls_and_accuracy_rises(finished_run):
    output_dir, _ = finished_run
    loss, accuracy = (list(logged(output_dir, key).values()) for key in ("loss", "mean_token_accuracy"))
    assert len(loss) == len(accuracy) == STEPS
    assert sum(loss[-5:]) < 0.8 * sum(loss[:5])
    assert sum(accuracy[-5:]) > sum(accuracy[:5])


def test_checkpoints_and_final_model_reload_and_generate(finished_run):
    output_dir, _ = finished_run
    assert (output_dir / f"checkpoint-{STEPS // 2}").is_dir() and (output_dir / f"checkpoint-{STEPS}").is_dir()
    assert not (output_dir / FINAL_STAGING_DIR).exists()  # the final model was published whole
    for folder in (output_dir, output_dir / f"checkpoint-{STEPS}"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "upper: a b c"}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        assert generated.shape[1] > prompt["input_ids"].shape[1]
        assert torch.isfinite(model(**prompt).logits).all()


def test_mlflow_holds_loss_and_efficiency_metrics(finished_run):
    _, tracking_uri = finished_run
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("turbo-tune-test")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    for key in ("loss", "mean_token_accuracy", "aux_loss", "step_time_s", "tokens_per_s", "tokens_per_s_per_device",
                "tflops_per_device", "eta_s", "gc_s_per_step", "peak_rss_gib"):
        history = client.get_metric_history(mlflow_run.info.run_id, key)
        assert len(history) >= STEPS - 1, key
    tokens_per_s = [m.value for m in client.get_metric_history(mlflow_run.info.run_id, "tokens_per_s")]
    assert all(value > 0 for value in tokens_per_s)


def test_mlflow_holds_evaluation_expert_load_pictures_and_system_metrics(finished_run):
    _, tracking_uri = finished_run
    client = MlflowClient(tracking_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("turbo-tune-test").experiment_id])
    run_id = mlflow_run.info.run_id
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_perplexity"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [STEPS // 2, STEPS], key
    for key in ("moe_load_max_over_mean", "moe_router_entropy", "moe_load_max_over_mean/layer_1",
                "moe_router_entropy/layer_0"):
        assert len(client.get_metric_history(run_id, key)) == STEPS, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"moe_load.png", "efficiency.png", f"checkpoint-{STEPS // 2}"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, f"checkpoint-{STEPS // 2}")] == [
        f"checkpoint-{STEPS // 2}/moe_load.png"]
    assert any(key.startswith("system/") for key in mlflow_run.data.metrics)  # MLflow's own, psutil being there


def test_eval_loss_falls_and_is_the_cross_entropy_behind_perplexity(finished_run):
    output_dir, _ = finished_run
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [STEPS // 2, STEPS]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    for entry in evals:
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]))
        assert "eval_aux_loss" not in entry  # the load-balancing term stays out of the evaluation loss
        assert 0 <= entry["eval_mean_token_accuracy"] <= 1


def test_pictures_are_written_beside_the_checkpoints_and_the_final_model(finished_run):
    output_dir, _ = finished_run
    for picture in (output_dir / "moe_load.png", output_dir / "efficiency.png",
                    output_dir / f"checkpoint-{STEPS // 2}" / "moe_load.png",
                    output_dir / f"checkpoint-{STEPS}" / "moe_load.png"):
        assert picture.read_bytes().startswith(b"\x89PNG"), picture


def test_resumed_run_reproduces_the_uninterrupted_losses(finished_run, tmp_path):
    output_dir, _ = finished_run
    resumed = tmp_path / "resumed"
    checkpoint = output_dir / f"checkpoint-{STEPS // 2}"
    assert run(resumed, "--report_to", "none", "--resume_from_checkpoint", str(checkpoint), *EVAL) == 0
    expected, got = losses(output_dir), losses(resumed)
    later_steps = [step for step in expected if step > STEPS // 2]
    assert later_steps and all(step in got for step in later_steps)
    for step in later_steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_sigterm_saves_a_checkpoint_that_resumes_exactly_and_marks_mlflow_killed(finished_run, tmp_path):
    """A scheduler's SIGTERM mid-run: a checkpoint at the current step, the MLflow run KILLED, one line saying how
    to resume, exit 143; resuming from it continues the uninterrupted run's losses exactly."""
    output_dir, tracking_uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start(*run_flags(output_dir, "--report_to", "mlflow", *EVAL),  # finished_run's data and evaluation
                    env={"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": "sigterm"})
    returncode, output = interrupt(process, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    (message,) = [line for line in output.splitlines() if line.startswith("qwen3_sft.py: ")]
    step = int(re.search(rf"stopped by SIGTERM at step (\d+) of {STEPS}; ", message)[1])
    assert message.endswith(f"--output_dir {output_dir} --resume_from_checkpoint last")
    assert 0 < step < STEPS and (output_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (output_dir / "model.safetensors").exists()
    client = MlflowClient(tracking_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert mlflow_run.info.status == "KILLED"

    assert run(output_dir, "--report_to", "none", "--resume_from_checkpoint", "last", *EVAL) == 0
    expected, got = losses(finished_run[0]), losses(output_dir)
    for later in range(step + 1, STEPS + 1):
        assert got[later] == pytest.approx(expected[later], rel=1e-6), later


def test_resuming_a_finished_run_says_so_and_writes_nothing(finished_run, capsys):
    output_dir, _ = finished_run
    before = snapshot(output_dir)
    assert run(output_dir, "--report_to", "none", "--resume_from_checkpoint", "last") == 0
    assert f"the run is already complete: {output_dir / f'checkpoint-{STEPS}'} is step {STEPS} of {STEPS}" in (
        capsys.readouterr().err)
    assert snapshot(output_dir) == before


def test_a_run_killed_while_publishing_its_final_model_is_not_called_complete(tmp_path, monkeypatch, capsys):
    """The final model is written into a staging folder and moved into the run folder file by file, and the run's
    trainer state is written after it. A run that dies in between has no trainer state there: resuming it says so and
    names the checkpoint that holds the trained weights, instead of calling the run complete."""
    output_dir = tmp_path / "out"
    flags = ["--output_dir", str(output_dir), "--bundled_examples", "64", "--max_steps", "4", "--save_steps", "4",
             "--gradient_checkpointing", "false", "--report_to", "none"]

    def killed_after_one_file(staged: Path, run_dir: Path) -> None:
        first = sorted(staged.iterdir())[0]
        first.replace(run_dir / first.name)
        raise RuntimeError("killed while publishing")

    monkeypatch.setattr(sft_trainer, "publish_final_model", killed_after_one_file)
    with pytest.raises(RuntimeError, match="killed while publishing"):
        qwen3_sft.main(flags)
    assert (output_dir / FINAL_STAGING_DIR).is_dir() and not (output_dir / "trainer_state.json").exists()
    monkeypatch.undo()
    before = snapshot(output_dir)
    assert qwen3_sft.main([*flags, "--resume_from_checkpoint", "last"]) == 0
    assert (f"stopped while writing its final model, so {output_dir} holds none: the trained weights are the ones in "
            f"{output_dir / 'checkpoint-4'}.") in capsys.readouterr().err
    assert snapshot(output_dir) == before


def test_resume_last_skips_a_checkpoint_whose_save_was_cut_short(finished_run, tmp_path, capsys):
    """A checkpoint folder without its trainer state (a save killed before checkpoints were staged) is not `last`."""
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run[0] / f"checkpoint-{STEPS}", output_dir / f"checkpoint-{STEPS}")
    shutil.copy(finished_run[0] / "trainer_state.json", output_dir)  # the run wrote its final model
    partial = output_dir / f"checkpoint-{STEPS + 5}"
    partial.mkdir()
    shutil.copy(finished_run[0] / "config.json", partial)
    assert run(output_dir, "--report_to", "none", "--resume_from_checkpoint", "last") == 0
    assert f"already complete: {output_dir / f'checkpoint-{STEPS}'}" in capsys.readouterr().err


def test_earlier_run_is_never_overwritten(finished_run, capsys):
    output_dir, _ = finished_run
    before = snapshot(output_dir)
    assert run(output_dir, "--report_to", "none") == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    assert snapshot(output_dir) == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--model_path", "/nonexistent/model"], "--model_path (MODEL_PATH) /nonexistent/model does not exist"),
    (["--data_path", "/nonexistent/data.jsonl"], "--data_path (DATA_PATH) /nonexistent/data.jsonl does not exist"),
    (["--eval_data_path", "/nonexistent/eval.jsonl"], "--eval_data_path /nonexistent/eval.jsonl does not exist"),
    (["--eval_split", "0.1", "--eval_data_path", "/nonexistent/eval.jsonl"], "both choose the evaluation data"),
    (["--global_batch_size", "7", "--micro_batch_size", "2"], "--global_batch_size 7 is not a positive multiple"),
    (["--deepspeed_config", "/nonexistent/zero3.json"], "--deepspeed_config (DS_CONFIG_PATH) /nonexistent"),
    (["--use_fp8"], "--use_fp8 needs a CUDA GPU with FP8 tensor cores"),
    (["--use_liger_kernel"], "--use_liger_kernel needs a CUDA GPU"),
    (["--activation_offloading"], "--activation_offloading moves activations from GPU memory"),
    (["--max_nonfinite_steps", "-1"], "--max_nonfinite_steps must be 0 (never stop) or a number of steps, got -1"),
])
def test_bad_input_stops_before_any_output(tmp_path, capsys, flags, message):
    if flags[0] in ("--use_liger_kernel", "--use_fp8", "--activation_offloading") and torch.cuda.is_available():
        pytest.skip("the flag may run on this machine's GPU")
    output_dir = tmp_path / "out"
    assert run(output_dir, "--report_to", "none", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not output_dir.exists()


def test_bad_record_stops_before_any_output(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    assert run(tmp_path / "out", "--report_to", "none", "--data_path", str(data)) == 2
    assert f"{data}, row 1, message 1: unknown role 'wizard'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_eval_data_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qwen3_sft, "load_model", lambda config: pytest.fail("the model was loaded"))
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    assert run(tmp_path / "out", "--report_to", "none", "--eval_data_path", str(data)) == 2
    err = capsys.readouterr().err
    assert f"--eval_data_path {data}, row 1: no assistant message" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_model_path_that_is_not_qwen3_moe_is_rejected(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tokenizer = AutoTokenizer.from_pretrained(Path(qwen3_sft.__file__).parent / "assets" / "tiny-qwen3-moe")
    tokenizer.save_pretrained(model_dir)
    assert run(tmp_path / "out", "--report_to", "none", "--model_path", str(model_dir)) == 2
    assert "holds a 'gpt2' model" in capsys.readouterr().err


def test_lora_run_saves_an_adapter_that_peft_restores_and_a_merged_model(tmp_path):
    from peft import PeftModel

    from turbo_tune.arguments import parse_config
    from turbo_tune.modeling import load_model

    output_dir = tmp_path / "lora"
    assert run(output_dir, "--report_to", "none", "--use_lora", "--merge_lora", "--lora_r", "4") == 0
    assert (output_dir / "adapter_config.json").is_file()
    base = load_model(parse_config(["--output_dir", str(tmp_path / "unused")]))  # the same seeded random init
    restored = PeftModel.from_pretrained(base, output_dir)
    lora_b = [p for name, p in restored.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged")
    tokens = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(merged(tokens).logits, restored.merge_and_unload()(tokens).logits)


def test_load_best_model_at_end_restores_every_weight_of_the_best_checkpoint(tmp_path):
    """The worst evaluation is made 'best' so that it is not the last checkpoint. The experts are saved one tensor per
    expert and live fused, so a non-strict state-dict load would leave them at the last step's values."""
    output_dir = tmp_path / "best"
    assert qwen3_sft.main([
        "--output_dir", str(output_dir), "--bundled_examples", "200", "--max_steps", "10", "--save_steps", "5",
        "--logging_steps", "5", "--gradient_checkpointing", "false", "--report_to", "none",
        "--load_best_model_at_end", "--greater_is_better", "true",
    ]) == 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-5"
    best = AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-5").state_dict()
    final = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    last = AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-10").state_dict()
    assert not torch.equal(best["model.layers.0.mlp.experts.gate_up_proj"],
                           last["model.layers.0.mlp.experts.gate_up_proj"])
    for name, tensor in best.items():
        torch.testing.assert_close(final[name], tensor, msg=name)


def test_packed_run_trains(tmp_path):
    output_dir = tmp_path / "packed"
    assert run(output_dir, "--report_to", "none", "--use_packing", "--max_length", "256") == 0
    assert len(losses(output_dir)) == STEPS
