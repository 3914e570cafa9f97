"""The pretrain loop on Megatron-Core: initialize, build model chunks, DDP, optimizer, schedule, train, evaluate,
checkpoint. One entry point, `pretrain(cfg)`; the CLI and the tests call it.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, model_parallel_cuda_manual_seed

from linear_moe import cpu
from linear_moe.config import Config
from linear_moe.model import build_model, transformer_config
from linear_moe.training import checkpoint, telemetry
from linear_moe.training.run_log import RunLog, Throughput, peak_memory_gib

log = logging.getLogger("linear_moe.train")


@dataclass
class TrainResult:
    """What a run reports back (rank 0 holds the reduced values; other ranks hold what they saw)."""

    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    """Train loss per logged step."""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    """Eval metrics per evaluated step."""



def initialize(cfg: Config) -> bool:
    """torch.distributed from the torchrun environment (or a one-process group), Megatron's parallel groups, seeds.

    Returns True when this call created the process group (and so `shutdown` should destroy it).
    """
    on_cpu = cpu.enable_cpu_mode()
    created = False
    if not dist.is_initialized():
        backend = "gloo" if on_cpu else "nccl"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if not on_cpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        else:
            # Plain `python examples/pretrain.py`: a one-process group needs no rendezvous address.
            if not on_cpu:
                torch.cuda.set_device(0)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    cfg.validate(world_size=dist.get_world_size())
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # Megatron copies each step's aux-loss scale into this class attribute, whose shape its first setter fixes
    # (an aux-loss backward outside the schedules makes it 0-dim); a run starts without it.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline, context_parallel_size=p.context,
        expert_model_parallel_size=p.expert)
    # Same weights on every TP and DP rank (CPU initialization draws full matrices, then slices them); each pipeline
    # stage gets its own stream so its layers differ from the other stages' (Megatron's rule).
    seed = cfg.train.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return created


def shutdown(created_group: bool) -> None:
    """Undo `initialize`, so that a process (a test) can run again with other parallel sizes."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    destroy_moe_metrics_tracker()
    # A class attribute whose shape the first run fixes; a later run in this process must start without it.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    telemetry.clear()
    parallel_state.destroy_model_parallel()
    if created_group and dist.is_initialized():
        dist.destroy_process_group()



def build_chunks(cfg: Config, tc) -> list[DistributedDataParallel]:
    """One GPTModel per (virtual) pipeline stage of this rank, each wrapped in Megatron DDP."""
    vpp = cfg.parallel.virtual_pipeline
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_model(cfg, tc, pre_process=pre, post_process=post, vp_stage=vp_stage))
    if not cpu.is_cpu_mode():
        for c in chunks:
            c.cuda(torch.cuda.current_device())
    # check_for_nan_in_grad (GPU; Megatron's check is CUDA-only): a NaN/Inf gradient stops the run at that step
    # (Megatron-LM's default) instead of being clipped into every parameter. On CPU a non-finite loss stops it.
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, check_for_nan_in_grad=not cpu.is_cpu_mode(),
        use_distributed_optimizer=not cpu.is_cpu_mode())
    wrapped = []
    for i, c in enumerate(chunks):
        # Only the first chunk's buckets may be large; Megatron's rule for interleaved schedules.
        wrapped.append(DistributedDataParallel(config=tc, ddp_config=ddp_cfg, module=c,
                                               disable_bucketing=i > 0))
    return wrapped


def build_optimizer(cfg: Config, tc, model):
    o = cfg.optim
    clip = o.clip_grad
    dist_opt = not cpu.is_cpu_mode()
    if cpu.is_cpu_mode() and clip > 0:
        # Megatron's grad-norm clipping uses CUDA multi-tensor kernels.
        log.info("CPU mode: optim.clip_grad=%s ignored (Megatron's clipping is CUDA-only); using 0", clip)
        clip = 0.0
    if cpu.is_cpu_mode():
        log.info("CPU mode: the distributed optimizer is CUDA-only; using the plain Megatron optimizer")
    oc = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, clip_grad=clip, bf16=tc.bf16, fp16=tc.fp16, params_dtype=tc.params_dtype,
        use_distributed_optimizer=dist_opt)
    optimizer = get_megatron_optimizer(oc, model)
    steps = cfg.train.steps
    warmup = min(o.warmup_steps, max(steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup, lr_decay_steps=steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, steps // 10) if o.decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if o.decay_style == "WSD" else None)
    return optimizer, scheduler


def _data_iterators(cfg: Config, n_chunks: int, consumed_samples: int):
    """(train, valid) iterators per model chunk: each (virtual) stage reads the same micro batches in order."""
    from linear_moe.data import build_data_iterators

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    pairs = [build_data_iterators(cfg, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples)
             for _ in range(n_chunks)]
    train, valid = [p[0] for p in pairs], [p[1] for p in pairs]
    return (train if n_chunks > 1 else train[0]), (valid if n_chunks > 1 else valid[0])



def _next_batch(data_iterator) -> dict:
    batch = next(data_iterator)
    dev = torch.device("cpu") if cpu.is_cpu_mode() else torch.device("cuda", torch.cuda.current_device())
    batch = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        # Megatron's zigzag split: the sequence in 2 * cp chunks, CP rank r keeps chunks r and 2cp-1-r (the layout
        # the mixers' CP path expects)
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                          cp_group=parallel_state.get_context_parallel_group())
    return batch


def _sum_over_cp(t: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_context_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_context_parallel_group())
    return t


def _train_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Masked CE of one micro batch: (sum, token count, log dict). Megatron divides the sum by the count and by the
    number of micro batches, so the step loss is the mean of per-micro-batch masked means.

    Under CP each rank holds part of the micro batch: it returns cp * its local sum and the micro batch's whole
    count, so that after Megatron's division and DDP's average over the CP ranks the gradient is the micro batch's
    masked mean, also when the CP ranks hold different numbers of masked tokens."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    stats = _sum_over_cp(torch.stack([loss.detach(), mask.sum()]))
    cp = parallel_state.get_context_parallel_world_size()
    return loss * cp, stats[1].to(torch.int), {"lm_loss": stats}


def train_forward_step(data_iterator, model):
    batch = _next_batch(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, partial(_train_loss, batch["loss_mask"])


def _eval_loss(cfg: Config, batch: dict, logits: torch.Tensor):
    """Eval CE and the data module's metrics (e.g. MQAR recall) from full-vocabulary logits [b, s, V]."""
    from linear_moe.data import evaluate_batch

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    logits = logits[..., :cfg.model.vocab_size].float()
    mask = batch["loss_mask"].reshape(-1).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
    loss = torch.sum(ce * mask)
    out = {"loss": _sum_over_cp(torch.stack([loss, mask.sum()]))}
    for k, v in evaluate_batch(cfg, logits, batch).items():
        out[k] = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to(loss.device),
                              torch.ones((), device=loss.device)])
    return loss, mask.sum().to(torch.int), out


def eval_forward_step(cfg: Config, data_iterator, model):
    batch = _next_batch(data_iterator)
    # Without labels the last stage returns logits (vocab-sharded under TP); other stages return hidden states.
    out = model(batch["tokens"], batch["position_ids"], None)
    return out, partial(_eval_loss, cfg, batch)



def _reporting_rank() -> bool:
    """One rank per data-parallel replica reports loss stats: last pipeline stage, TP rank 0, CP rank 0."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0)


def _reduce_ratios(local: dict[str, torch.Tensor]) -> dict[str, float]:
    """Reduce {name: [sum, count]} over all reporting ranks to {name: sum / count}. A collective: all ranks call."""
    mine = {k: v.tolist() for k, v in local.items()} if _reporting_rank() else {}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    total: dict[str, list[float]] = {}
    for d in gathered:
        for k, (s, n) in d.items():
            acc = total.setdefault(k, [0.0, 0.0])
            acc[0] += s
            acc[1] += n
    return {k: s / n for k, (s, n) in total.items() if n > 0}


def _accumulate(acc: dict[str, torch.Tensor], outputs: list[dict]) -> None:
    for d in outputs:
        for k, v in d.items():
            acc[k] = acc[k] + v.detach() if k in acc else v.detach().clone()


def _aux_losses(num_layers: int, scale: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every aux loss in Megatron's MoE tracker (MoE 'load_balancing_loss', MoM 'mom_load_balancing_loss', ...):
    reduced over ranks with Megatron's own helper, then (mean over the layers that recorded it, per-layer values)."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    # A pipeline stage without MoE/MoM layers has no entries; the reduction is a collective, so every rank must
    # hold every name first.
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(tracker.metrics))
    union = sorted({n for ns in names for n in ns})
    for n in union:
        tracker.ensure_initialized(n, num_layers, device="cpu" if cpu.is_cpu_mode() else None)
    with warnings.catch_warnings():
        # The dict-style helpers are deprecated aliases of the tracker methods; same reduction.
        warnings.simplefilter("ignore")
        moe_utils.reduce_aux_losses_tracker_across_ranks(union)
        entries = moe_utils.get_moe_layer_wise_logging_tracker()
        means, per_layer = {}, {}
        for n in union:
            vals = entries[n]["values"].float() * scale
            recorded = vals != 0
            means[n] = float(vals[recorded].mean()) if recorded.any() else 0.0
            per_layer[n] = vals.tolist()
        moe_utils.clear_aux_losses_tracker()
    return means, per_layer


def _telemetry() -> dict[str, float]:
    """Mixer telemetry (training.telemetry.record) averaged over ranks and observations, per name and layer."""
    mine = telemetry.collect()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    total: dict[tuple[str, int], list[float]] = {}
    for d in gathered:
        for k, (s, n) in d.items():
            acc = total.setdefault(k, [0.0, 0])
            acc[0] += s
            acc[1] += n
    return {f"{name}/layer_{layer}": s / n for (name, layer), (s, n) in sorted(total.items())}



def _set_aux_loss_scale(tc, n_micro: int) -> None:
    """The aux-loss gradient scale (MoM's balance and z-losses) by the schedules' rule: loss scale * CP size /
    micro batches. Megatron's schedules set it only when the model has MoE layers; without it the aux losses of a
    MoM-only model would weigh `n_micro` times too much (and 1/cp too little under CP)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    dev = torch.device("cpu") if cpu.is_cpu_mode() else torch.device("cuda", torch.cuda.current_device())
    one = torch.ones(1, device=dev)
    scale = tc.grad_scale_func(one) if tc.grad_scale_func is not None else one
    MoEAuxLossAutoScaler.set_loss_scale(scale.detach() * parallel_state.get_context_parallel_world_size() / n_micro)


def _evaluate(cfg: Config, model, valid_iter, fb, tc) -> dict[str, float]:
    for m in model:
        m.eval()
    with torch.no_grad():
        outputs = fb(forward_step_func=partial(eval_forward_step, cfg), data_iterator=valid_iter, model=model,
                     num_microbatches=cfg.train.eval_steps, seq_length=cfg.train.seq_length,
                     micro_batch_size=cfg.train.micro_batch_size, forward_only=True)
    for m in model:
        m.train()
    # Aux losses recorded during eval forward passes are not training signal.
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().clear()
    telemetry.clear()
    acc: dict[str, torch.Tensor] = {}
    _accumulate(acc, outputs or [])
    return _reduce_ratios(acc)


def pretrain(cfg: Config) -> TrainResult:
    """Train `cfg` (already loaded and validated without a world size); returns the logged losses and evals."""
    if cfg.checkpoint.load:
        checkpoint.find_latest(cfg.checkpoint.load)
    created = initialize(cfg)
    try:
        return _train(cfg)
    finally:
        shutdown(created)


def _train(cfg: Config) -> TrainResult:
    t = cfg.train
    rank0 = dist.get_rank() == 0
    tc = transformer_config(cfg, cpu=cpu.is_cpu_mode())
    model = build_chunks(cfg, tc)
    optimizer, scheduler = build_optimizer(cfg, tc, model)
    # Megatron's schedules call these hooks: grad sync (DP/TP/SP/embedding), loss scaling, no_sync for accumulation.
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    tc.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync

    step, consumed = 0, 0
    if cfg.checkpoint.load:
        info = checkpoint.load(cfg.checkpoint.load, model=model, optimizer=optimizer, scheduler=scheduler)
        step, consumed = info["step"], info["consumed_samples"]
        if rank0:
            log.info("resumed from %s at step %d%s", cfg.checkpoint.load, step,
                     "" if info["rng_restored"] else " (other parallel layout: RNG state not restored)")
    train_iter, _ = _data_iterators(cfg, len(model), consumed)

    dp = parallel_state.get_data_parallel_world_size()
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    fb = get_forward_backward_func()
    runlog = RunLog(cfg, enabled=rank0, total_steps=t.steps, start_step=step)
    throughput = Throughput(cfg, dist.get_world_size())
    result = TrainResult(step=step)
    acc: dict[str, torch.Tensor] = {}
    steps_since_log, t_log, grad_norms = 0, time.perf_counter(), []
    try:
        while step < t.steps:
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            if tc.num_moe_experts is None:
                _set_aux_loss_scale(tc, n_micro)
            outputs = fb(forward_step_func=train_forward_step, data_iterator=train_iter, model=model,
                         num_microbatches=n_micro, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                         forward_only=False)
            ok, grad_norm, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            step += 1
            consumed += t.global_batch_size
            steps_since_log += 1
            _accumulate(acc, outputs or [])
            if grad_norm:
                grad_norms.append(float(grad_norm))
            runlog.step()

            if step % t.log_interval == 0 or step == t.steps:
                ratios = _reduce_ratios(acc)
                aux, aux_layers = _aux_losses(cfg.model.num_layers, 1.0 / (n_micro * steps_since_log))
                tele = _telemetry()
                dt = time.perf_counter() - t_log
                rec = {"step": step, "loss": ratios.get("lm_loss", float("nan")), **aux,
                       "lr": optimizer.param_groups[0]["lr"],
                       **throughput.metrics(steps_since_log * t.global_batch_size * t.seq_length, dt),
                       "ms_per_step": 1000 * dt / steps_since_log}
                peak = peak_memory_gib()
                if peak is not None:
                    rec["peak_mem_gib"] = peak
                if grad_norms:
                    rec["grad_norm"] = sum(grad_norms) / len(grad_norms)
                runlog.write(rec)
                if tele:
                    runlog.write({"step": step, **tele}, kind="telemetry")
                if runlog.writer is not None:
                    for name, vals in aux_layers.items():
                        for i, v in enumerate(vals):
                            if v:
                                runlog.writer.add_scalar(f"aux/{name}/layer_{i + 1}", v, step)
                result.losses[step] = rec["loss"]
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"train loss is {rec['loss']} at step {step}: the run diverged; lower "
                                             "optim.lr or raise optim.warmup_steps, or resume from an earlier "
                                             "checkpoint")
                acc, steps_since_log, grad_norms, t_log = {}, 0, [], time.perf_counter()

            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                # A fresh validation iterator each time: every evaluation sees the same batches, also after resume.
                ev = _evaluate(cfg, model, _data_iterators(cfg, len(model), 0)[1], fb, tc)
                result.evals[step] = ev
                runlog.write({"step": step, **ev}, kind="eval")
                t_log = time.perf_counter()

            c = cfg.checkpoint
            if c.save and ((c.interval and step % c.interval == 0) or step == t.steps):
                path = checkpoint.save(c.save, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                       cfg=cfg, consumed_samples=consumed)
                if rank0:
                    log.info("saved checkpoint %s", path)
                t_log = time.perf_counter()
        result.step = step
    finally:
        runlog.close()
    return result
