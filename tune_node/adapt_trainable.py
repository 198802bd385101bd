"""The Ray Tune function trainable of step and tolerance adaptation: one trial trains one seed.

:func:`adapt_trial` trains with :class:`~tune_node.adaptation.StepAdaptation` or
:class:`~tune_node.adaptation.ToleranceAdaptation` through
:func:`tune_node.training.train` (which knows nothing of Ray). Each report interval it
calls ``tune.report`` with the scalars TensorBoard shows (step size or tolerance,
solver steps, NFE, the last check's train- and test-solver batch accuracies, test
accuracy) and a checkpoint holding the whole training state, the controller's
included, so a restored trial continues exactly where it stopped. At the end its
final checkpoint also holds ``final.json`` with the rows of
:mod:`tune_node.adaptation_results` (and the paper's cross-solver test matrix),
from which :func:`~tune_node.adaptation_results.write_tables` builds
``adaptation.csv`` and ``adaptation_history.csv``.

Checkpointing, re-reporting a finished trial and resource handling are the grid
trainable's (:mod:`tune_node.trainable`).
"""

from __future__ import annotations

import json

from ray import tune

from .adaptation import StepAdaptation, ToleranceAdaptation
from .adaptation_results import history_rows, summary_row
from .datasets import load_dataset
from .solvers import SolverSetting
from .trainable import FINAL_FILE, _report_with_checkpoint, _restored_state, start_trial
from .training import Progress, TrainConfig, train

__all__ = ["adapt_trial", "train_config_from_adapt_trial", "controller_for", "starting_setting", "TRAIN_KEYS"]

# The TrainConfig fields an adaptation trial config carries (besides dataset, solver and device).
TRAIN_KEYS = ("seed", "iterations", "lr", "batch_size", "optimizer", "report_every", "test_every", "eval_batch_size",
              "data_root", "download")


def starting_setting(mode: str, method: str, gradient: str, initial_tol: float) -> SolverSetting:
    """A placeholder train setting of the right kind; the controller replaces it with its starting one.

    It fixes the paper's training defaults (MNIST trains adaptive solvers with Adam).
    """
    if mode == "step":
        return SolverSetting.fixed(method, 1, gradient)
    return SolverSetting.adaptive(method, initial_tol, gradient)


def train_config_from_adapt_trial(trial: dict, device: str = "cpu") -> TrainConfig:
    """The :class:`TrainConfig` of an adaptation trial config, at a placeholder starting setting."""
    setting = starting_setting(trial["mode"], trial["method"], trial["gradient"], trial["initial_tol"])
    return TrainConfig(dataset=trial["dataset"], solver=setting, device=device, **{k: trial[k] for k in TRAIN_KEYS})


def controller_for(trial: dict, config: TrainConfig, data=None):
    """``(config, controller)`` of an adaptation trial config: the controller at its starting value.

    Step mode starts at Hairer, Norsett & Wanner's step on the first batch; tolerance
    mode at ``trial["initial_tol"]``. Raises ValueError on invalid adaptation parameters.
    """
    kwargs = {"test_method": trial["test_method"], "k": trial["k"], "threshold": trial["threshold"]}
    if trial["mode"] == "step":
        return StepAdaptation.for_training(config, data=data, **kwargs)
    return ToleranceAdaptation.for_training(config, tol=trial["initial_tol"], **kwargs)


def _metrics(progress: Progress, controller, totals: dict) -> dict:
    it = progress.iteration
    metrics = {
        "timesteps_total": it,  # TensorBoard's x axis: training iterations
        "iteration": it,
        "loss": progress.loss,
        "train_accuracy": progress.train_accuracy,  # the current batch's
        ("step_size" if controller.mode == "step" else "tol"): controller.value,  # for the next iteration
        "solver_steps": progress.steps,
        "nfe_forward": progress.nfe_forward,
        "nfe_backward": progress.nfe_backward,
        "nfe_per_iteration": progress.nfe_forward + progress.nfe_backward,  # this iteration's training passes
        "train_forward_nfe_per_iteration": totals["fwd"] / it,  # since the start
        "check_nfe_per_iteration": totals["check"] / it,
        "check_nfe": progress.check_nfe,
        "total_nfe": progress.total_nfe,
    }
    if controller.history:
        last = controller.history[-1]
        metrics.update(train_solver_accuracy=last.train_solver_accuracy, test_solver_accuracy=last.test_solver_accuracy,
                       check_accepted=float(last.accepted), check_iteration=last.iteration)
    if progress.test_accuracy is not None:
        metrics["test_accuracy"] = progress.test_accuracy
    return metrics


def adapt_trial(config: dict) -> None:
    """Train one adaptation trial config (key ``"trial"``; see :mod:`tune_node.adapt`).

    Threads and device follow the trial's resources (:func:`~tune_node.trainable.start_trial`).
    """
    trial = config["trial"]
    device = start_trial()
    if device is None:
        return
    train_config = train_config_from_adapt_trial(trial, device=device)
    data = load_dataset(train_config.dataset, train_config.seed, train_config.data_root, train_config.download)
    train_config, controller = controller_for(trial, train_config, data)
    resume_from = _restored_state()  # train() restores the controller's state from it too
    last = {"state": (lambda: resume_from) if resume_from is not None else None}

    def on_report(progress: Progress, state_fn) -> None:
        last["state"] = state_fn
        state = state_fn()
        last["metrics"] = _metrics(progress, controller, state["totals"])
        if progress.iteration < train_config.iterations:
            _report_with_checkpoint(last["metrics"], state)

    result = train(train_config, on_report=on_report, controller=controller, resume_from=resume_from, data=data)
    rows = result.cross_solver_table(data)
    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:
        trial_id = None
    summary = summary_row(result, controller, trial["experiment"], trial_id)
    finer = [r["accuracy"] for r in rows if not r["is_train_solver"]]
    metrics = {
        **last.get("metrics", {"timesteps_total": result.iterations, "iteration": result.iterations}),
        "train_accuracy": result.train_accuracy,  # now over the whole train set
        "test_accuracy": result.test_accuracy,
        "nfe_per_iteration": result.nfe_per_iteration,  # as in the grid: forward, backward and checks, whole run
        "adaptation_nfe_per_iteration": summary["nfe_per_iteration"],  # the paper's Table 1 number
        "cross_solver_min_accuracy": min(finer) if finer else result.test_accuracy,
        "done_training": True,
    }
    if result.diverged is not None:
        metrics.update(timesteps_total=result.diverged.iteration, iteration=result.diverged.iteration,
                       diverged_at_iteration=result.diverged.iteration)
    final = {
        "trial_id": trial_id,
        "config": trial,
        "device": device,
        "summary": summary,
        "history": history_rows(result, controller, trial_id),
        "cross_solver": rows,
        "metrics": metrics,
    }
    # A diverged run's weights are not finite: its final checkpoint keeps final.json alone.
    state = last["state"]() if last["state"] is not None and result.diverged is None else None
    _report_with_checkpoint(metrics, state, {FINAL_FILE: json.dumps(final, indent=1)})
