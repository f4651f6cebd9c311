from __future__ import annotations

import math

import pytest
import torch

from hpo.learn.data import DeviceData
from hpo.learn.params import TrialParams
from hpo.learn.train import Hooks, TrainingDiverged, TrainingRun, evaluate, fit, get_lr, seeded_model
from hpo.settings.config import Augment, TrainSettings

PARAMS = dict(
    n_conv=1,
    filters_0=8,
    kernel_size=3,
    n_fc=1,
    fc_size=32,
    dropout=0.0,
    optimizer="adam",
    lr=3e-3,
    batch_size=32,
    weight_decay=0.0,
)
CPU = torch.device("cpu")


def model_of(params: dict, seed: int) -> torch.nn.Module:
    return seeded_model(TrialParams.from_flat(params).model, seed, CPU)


def run_of(params: dict, settings: TrainSettings, augment: Augment, epochs: int, seed: int) -> TrainingRun:
    return TrainingRun(TrialParams.from_flat(params).optimizer, settings, augment, epochs, seed)


def synthetic(n: int = 256, seed: int = 0) -> DeviceData:
    """Each class is a bright square at its own position: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
        images[i, r : r + 8, col : col + 4] = 255
    return DeviceData(images, labels, CPU)


def test_loss_falls_and_accuracy_rises_on_a_synthetic_set():
    data = synthetic()
    model = model_of(PARAMS, 0)
    before = evaluate(model, data)
    history = fit(model, data, data, run_of(PARAMS, TrainSettings(schedule="constant"), Augment(), 8, 0))
    assert history[-1].train_loss < 0.5 * history[0].train_loss
    assert history[-1].val_accuracy > before.accuracy + 0.3


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop"])
def test_every_optimizer_trains(optimizer):
    params = {**PARAMS, "optimizer": optimizer, "lr": 3e-3 if optimizer != "sgd" else 3e-2}
    data = synthetic()
    model = model_of(params, 0)
    history = fit(model, data, None, run_of(params, TrainSettings(schedule="constant"), Augment(), 4, 0))
    assert history[-1].train_loss < history[0].train_loss


def test_same_seed_same_result_different_seed_different_result():
    data = synthetic()

    def run(seed: int) -> float:
        model = model_of(PARAMS, seed)
        return fit(model, data, data, run_of(PARAMS, TrainSettings(), Augment(2, True), 2, seed))[-1].val_loss

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_callback_sees_every_epoch_and_can_stop_training():
    data = synthetic(64)
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(stats):
        seen.append(stats.epoch)
        if stats.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(model_of(PARAMS, 0), data, data, run_of(PARAMS, TrainSettings(), Augment(), 5, 0), Hooks(on_epoch))
    assert seen == [1, 2]


def test_divergence_is_reported_not_hidden():
    params = {**PARAMS, "optimizer": "sgd", "lr": 1e6}
    data = synthetic(64)
    with pytest.raises(TrainingDiverged, match="training loss became"):
        fit(model_of(params, 0), data, None, run_of(params, TrainSettings(schedule="constant"), Augment(), 3, 0))


def test_batch_larger_than_the_data_still_takes_one_step():
    params = {**PARAMS, "batch_size": 1024}
    data = synthetic(100)
    history = fit(model_of(params, 0), data, None, run_of(params, TrainSettings(), Augment(), 1, 0))
    assert math.isfinite(history[0].train_loss)


def test_lr_schedules():
    assert get_lr(0, 100, 1.0, "constant", 10) == pytest.approx(0.1)  # warmup ramps up
    assert get_lr(9, 100, 1.0, "cosine", 10) == pytest.approx(1.0)
    assert get_lr(10, 100, 1.0, "cosine", 10) == pytest.approx(1.0)
    assert get_lr(55, 100, 1.0, "cosine", 10) == pytest.approx(0.5)
    assert get_lr(100, 100, 1.0, "cosine", 10) == pytest.approx(0.0, abs=1e-9)
    assert get_lr(55, 100, 1.0, "onecycle", 10) == pytest.approx(0.5)
    assert get_lr(50, 100, 1.0, "constant", 0) == 1.0


def test_evaluate_counts_correct_predictions():
    data = synthetic(40)
    model = model_of(PARAMS, 0)
    ev = evaluate(model, data, batch_size=7)
    assert ev.predictions.shape == (40,)
    assert ev.accuracy == pytest.approx(float((ev.predictions == data.y).float().mean()))


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop"])
def test_resuming_from_a_snapshot_repeats_the_uninterrupted_run(optimizer, tmp_path):
    """A trial retried after a crash resumes from its last checkpoint; the rest of the run must be
    the one it would have had: same batches, augmentation, dropout and learning rates."""
    params = {**PARAMS, "optimizer": optimizer, "dropout": 0.3, "lr": 3e-3 if optimizer != "sgd" else 3e-2}
    data, val = synthetic(), synthetic(64, seed=1)
    run = run_of(params, TrainSettings(schedule="cosine", warmup_epochs=0.5), Augment(2, True), 4, 5)

    straight = fit(model_of(params, 5), data, val, run)

    snapshots = []

    def save(state):  # through torch.save, as the checkpoint artifact is
        path = tmp_path / f"epoch{state['epoch']}.pt"
        torch.save(state, path)
        snapshots.append(path)

    fit(model_of(params, 5), data, val, run, Hooks(on_snapshot=save))
    assert [p.name for p in snapshots] == ["epoch1.pt", "epoch2.pt", "epoch3.pt", "epoch4.pt"]
    torch.manual_seed(12345)  # whatever the new process's global RNG holds, the snapshot restores it
    state = torch.load(snapshots[1], weights_only=True)
    resumed = fit(model_of(params, 99), data, val, run, resume=state)
    assert [s.epoch for s in resumed] == [1, 2, 3, 4]
    assert [s.train_loss for s in resumed[:2]] == [s.train_loss for s in straight[:2]]  # restored history
    for a, b in zip(resumed[2:], straight[2:]):
        assert (a.train_loss, a.val_loss, a.val_accuracy, a.lr) == (b.train_loss, b.val_loss, b.val_accuracy, b.lr)


def test_replan_changes_the_epochs_and_the_schedule_ends_at_zero():
    data = synthetic(64)
    asked = []

    def replan(history, total):
        asked.append((len(history), total))
        return 3 if len(history) == 1 else total

    run = run_of(PARAMS, TrainSettings(schedule="cosine"), Augment(), 6, 0)
    history = fit(model_of(PARAMS, 0), data, None, run, Hooks(replan=replan))
    assert [s.epoch for s in history] == [1, 2, 3]
    assert asked == [(1, 6), (2, 3), (3, 3)]
    # 64 images at batch 32: 2 steps an epoch; the last of the 6 steps has the cosine's last value.
    assert history[-1].lr == pytest.approx(get_lr(5, 6, PARAMS["lr"], "cosine", 0))


def _snapshot_after(params: dict, run: TrainingRun, data: DeviceData, val: DeviceData, epoch: int) -> dict:
    snapshots: list[dict] = []
    fit(model_of(params, 5), data, val, run, Hooks(on_snapshot=snapshots.append))
    return snapshots[epoch - 1]


def test_a_trial_checkpoint_is_loaded_on_the_cpu_whatever_the_trials_device(tmp_path):
    """The generator and RNG setters take CPU byte tensors only: a checkpoint loaded straight onto a
    GPU (map_location=device) made every resume on a GPU host crash. The loader keeps all on the CPU."""
    import optuna

    from hpo import attrs
    from hpo.learn import checkpoints
    from hpo.search import artifacts
    from hpo.search.objective import load_resume_state

    data, val = synthetic(64), synthetic(32, seed=1)
    run = run_of(PARAMS, TrainSettings(), Augment(), 3, 5)
    state = _snapshot_after(PARAMS, run, data, val, 1)
    params = TrialParams.from_flat(PARAMS)
    store = artifacts.open_store(str(tmp_path / "artifacts"))
    trial = optuna.create_study().ask()
    payload = {**state, "format": checkpoints.TRIAL_FORMAT, "params": params.flat(), "seed": 5}
    artifact_id = artifacts.upload_bytes(store, trial, "checkpoint-epoch1.pt", artifacts.torch_bytes(payload))
    trial.set_user_attr(attrs.CHECKPOINT, {"artifact_id": artifact_id, "epoch": 1})

    loaded = load_resume_state(store, trial, params, 5)
    assert loaded is not None and loaded["device"] == "cpu"
    for key in ("generator", "rng"):
        assert (loaded[key].device.type, loaded[key].dtype) == ("cpu", torch.uint8), key
    assert all(t.device.type == "cpu" for t in loaded["model"].values())


class _RecordingGenerator:
    """Stands in for a CUDA generator, which this machine cannot make: records what it is handed."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []
        self.seeds: list[int] = []

    def set_state(self, state: torch.Tensor) -> None:
        self.states.append(state)

    def manual_seed(self, seed: int) -> None:
        self.seeds.append(seed)


def test_a_gpu_snapshot_resumes_on_a_gpu_with_cpu_byte_tensors(monkeypatch):
    from hpo.learn.train import restore_random_state

    handed: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: handed.append(state))
    cuda_state = torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    resume = {"generator": cuda_state.clone(), "rng": cuda_state.clone(), "device": "cuda", "epoch": 2}
    generator = _RecordingGenerator()
    assert restore_random_state(resume, generator, 5, torch.device("cuda:0"))  # type: ignore[arg-type]
    for state in [*generator.states, *handed]:
        assert (state.device.type, state.dtype) == ("cpu", torch.uint8)
        assert torch.equal(state, cuda_state)
    assert len(generator.states) == len(handed) == 1


def test_a_cpu_snapshot_on_a_gpu_reseeds_instead_of_crashing(monkeypatch):
    from hpo.learn.train import restore_random_state

    data, val = synthetic(64), synthetic(32, seed=1)
    state = _snapshot_after(PARAMS, run_of(PARAMS, TrainSettings(), Augment(), 3, 5), data, val, 2)
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    generator = _RecordingGenerator()
    assert not restore_random_state(state, generator, 5, torch.device("cuda:0"))  # type: ignore[arg-type]
    assert generator.states == [] and generator.seeds == seeded and len(seeded) == 1


def test_a_snapshot_written_on_a_gpu_resumes_on_the_cpu():
    """A trial killed on a GPU host and retried on a CPU host: the weights, optimizer and history
    carry on from the GPU's epoch; the random streams restart from a seed (no bit-exactness across
    device types), where before the CPU generator refused the 16-byte CUDA state and the retry died."""
    data, val = synthetic(), synthetic(64, seed=1)
    run = run_of(PARAMS, TrainSettings(schedule="cosine"), Augment(2, True), 4, 5)
    state = _snapshot_after(PARAMS, run, data, val, 2)
    # What the same snapshot holds when written on a GPU: CUDA generator states, tagged "cuda".
    gpu_state = {**state, "generator": torch.arange(16, dtype=torch.uint8), "rng": torch.arange(16, dtype=torch.uint8)}
    gpu_state["device"] = "cuda"
    resumed = fit(model_of(PARAMS, 99), data, val, run, resume=gpu_state)
    assert [s.epoch for s in resumed] == [1, 2, 3, 4]
    assert [s.train_loss for s in resumed[:2]] == [row["train_loss"] for row in state["history"]]
    assert all(math.isfinite(s.train_loss) for s in resumed)
    # The weights did carry on: epoch 3 starts from epoch 2's model, not from a fresh one.
    fresh = fit(model_of(PARAMS, 99), data, val, dataclasses_replace(run, epochs=1))
    assert resumed[2].train_loss < fresh[0].train_loss


def dataclasses_replace(run: TrainingRun, **changes) -> TrainingRun:
    import dataclasses

    return dataclasses.replace(run, **changes)
