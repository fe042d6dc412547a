"""FusedAdamW: torch.optim.AdamW's update in one kernel launch per parameter group, with no host sync. (Just over
400 lines, long because one optimizer class holds the state handling that its three backends share.)

Same arguments and meaning as `torch.optim.AdamW` (lr, betas, eps, weight_decay, amsgrad, maximize), plus
`bias_correction` (BERT's original recipe ran without) and `master_weights`. Per step, for each parameter with a
gradient, with t the step count after this step:

    w ← w·(1 − lr·λ);  m ← m + (1 − β1)(g − m);  v ← β2·v + (1 − β2)·g²;  (amsgrad: v_max ← max(v_max, v))
    w ← w − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)            (bias_correction=False: both corrections are 1)

Design. The state is torch.optim.AdamW's, tensor for tensor (`step` an fp32 scalar on the parameter's device, as
torch's fused AdamW keeps it; `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` shaped and strided like the
parameter), so state dicts move between the two optimizers both ways. The kernels read every tensor of a bucket
(the parameters of one group, device and dtype) through a table of addresses rather than flat buffers: the
parameters stay the user's own tensors, so `param.data = ...`, `model.to(...)`, `model.load_state_dict(...)` and
`optimizer.load_state_dict(...)` need no cooperation; a changed address is seen by comparing the table with the
cached one (a gradient reallocated elsewhere, as zero_grad(set_to_none=True) allows, rebuilds the addresses
only). Non-contiguous parameters whose gradient and state share their strides and cover their storage densely
are updated in place in memory order; others, and tensors not starting on a 16-byte boundary (the Triton
kernel's vector accesses assume it; fresh allocations always do), go through staging copies kept from step to
step.

CUDA graphs. A step reads no device value on the host: step counts stay on the device and the bias corrections
are computed in the kernels; a tensor lr is read by the kernels where it lies (the C++ kernel through its
address); tensor betas are read on the host when first seen and after an in-place change only. Once a bucket's
address table is built (first step; again only when an address moves), each step launches the same kernels with
the same arguments, so `optimizer.step()` can be captured with `torch.cuda.graph` and replayed. A capture bakes in
Python numbers (a float lr, betas, eps, weight decay): a rate that changes must be a tensor on the parameters'
device that is updated in place, as `fastcls.components.lr_schedule.DeviceLRSchedule` does (a tensor elsewhere
is copied to the device every step, which a capture cannot hold).

Backends (registered below with `fastcls.ops.dispatch`, keyed by parameter dtype and master weights): triton
for CUDA (fp32, bf16 and fp16 parameters, with or without master weights); cpp for the CPU (fp32, and bf16 with
master weights; embedding tables row-sparse: fastcls.optim.row_sparse, and with `defer_untouched_rows` their
untouched rows deferred until read: fastcls.optim.deferred_rows); the reference (PyTorch ops, the same
math in fp32, sync-free) for everything else, and for gradients whose dtype is not the parameter's.

Mixed precision: `_step_supports_amp_scaling` is set, so `torch.amp.GradScaler.step` hands the optimizer
`grad_scale` (None once `scaler.unscale_` has run) and `found_inf` as attributes, the protocol of torch's fused
AdamW. The kernels divide the gradients by grad_scale (and store them unscaled, as unscale_ would) and, when
found_inf is nonzero, change nothing: no weight, moment, gradient or step count.

Gradient clipping: `max_grad_norm` > 0 makes a step do what `torch.nn.utils.clip_grad_norm_(params,
max_grad_norm)` before it would, without its passes over the gradients (a norm per tensor, then a multiply that
rewrites every gradient). The step first sums the squares of every gradient it will update, all groups and
buckets, one pass per bucket over the bucket's address table (C++: AVX-512, summed in fp64; Triton: an fp32 sum
per program; reference: torch's norms), unscaled by grad_scale; the norm of the total goes to `grad_norm` (an
fp32 device tensor, what clip_grad_norm_ returns; None before the first clipped step), and
`min(1, max_grad_norm / (norm + 1e-6))`, clip_grad_norm_'s coefficient computed by the same fp32 ops, is a device
tensor that the update kernels read and multiply the gradients by in registers. Nothing is read on the host and
the gradients are left as they were (unscaled under grad_scale, as before, but not clipped). Like clip_grad_norm_
without error_if_nonfinite, a non-finite norm is not an error: an infinite one zeroes the finite gradients' part
of the step and NaN spreads; GradScaler's found_inf skips such steps anyway. It is an attribute of the optimizer,
not of its groups (one norm spans them all), and not part of the state dict.

`master_weights=True` keeps, for bf16/fp16 parameters, an fp32 copy in the state under "master_param" and fp32
moments; the update runs on the copy and the parameter receives it rounded. torch.optim.AdamW loading such a
state dict ignores "master_param" and rounds the moments to the parameter dtype; FusedAdamW loading torch's state
dict (bf16 moments, no master) widens the moments and starts the master from the parameter. A master put in the
state before the first step (`optimizer.state[p]["master_param"] = w`, w the fp32 value p was rounded from) is
kept (`fastcls.components.bf16_weights`). A parameter changed
behind the optimizer's back (its address or version counter moved, e.g. by `model.load_state_dict`) has its
master refreshed at the next step wherever the two disagree; writes through `param.data` move no version counter
and are not seen.
"""
import torch

from fastcls.ops import cpp, dispatch
from fastcls.optim.adamw_table import (
    AddressTable, Bucket, Entry, StagingBuffers, dense_strides, is_dense, to_device)
from fastcls.optim.deferred_rows import DeferredRows
from fastcls.optim.reference import adamw_reference, grad_sum_of_squares_reference
from fastcls.optim.row_sparse import LiveRows

MASTER_KEY = "master_param"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
dispatch.register_op("adamw", cpp=cpp.ADAMW_KERNELS, triton=(
    torch.float32, torch.bfloat16, torch.float16, (torch.bfloat16, "master"), (torch.float16, "master")))
_GROUP_OPTIONS = ("amsgrad", "maximize", "bias_correction", "master_weights")


def _scalar(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    return float(value)


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW as one kernel launch per parameter group (see the module doc).

    Args beyond torch.optim.AdamW's: `bias_correction` (default True) divides the moments by 1 − βᵗ;
    `master_weights` keeps fp32 master copies and moments for bf16/fp16 parameters; `max_grad_norm` (> 0) clips
    the gradients' total norm as clip_grad_norm_ would, inside the step (module doc; the norm in `grad_norm`);
    `backend` forces "triton", "cpp" or "reference" (default: `fastcls.ops.dispatch.backend_for` per device and
    dtype); `defer_untouched_rows` (default False; fastcls's trainer turns it on) lets an embedding table's rows
    that a step's batch did not touch skip the step until they are read (fastcls.optim.deferred_rows: read
    through fastcls's embedding op, `sync_deferred_rows()`, or `state_dict()`, to the dense step's bits). lr may
    be a float or a one-element tensor (fp32 or fp64, best on the parameters' device), and may differ per group;
    schedulers write `group["lr"]` as usual, and `DeviceLRSchedule` writes into a tensor lr on the device.
    """
    row_sparse = True  # False: the dense step for embedding tables too (fastcls.optim.row_sparse)

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, bias_correction: bool = True,
        master_weights: bool = False, max_grad_norm: float = 0.0, backend: str | None = None,
        defer_untouched_rows: bool = False,
    ):
        if _scalar(lr, "lr") < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
        for index, beta in enumerate(betas):
            if not 0.0 <= _scalar(beta, f"betas[{index}]") < 1.0:
                raise ValueError(f"betas[{index}] must be in [0, 1), got {beta}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {max_grad_norm}")
        if backend is not None and backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS} or None, got {backend!r}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "maximize": maximize, "bias_correction": bias_correction, "master_weights": master_weights}
        super().__init__(params, defaults)
        # GradScaler then passes grad_scale / found_inf to step() instead of unscaling and syncing itself
        self._step_supports_amp_scaling = True
        self.backend = backend
        self.max_grad_norm = float(max_grad_norm)
        self.grad_norm: torch.Tensor | None = None  # the last clipped step's gradient norm, on the device
        self._tables: dict[tuple, AddressTable] = {}
        self._betas64: dict[tuple, torch.Tensor] = {}
        self._staging = StagingBuffers()
        # tensor hyperparameter -> (its version when read, its value): see _host_float
        self._tensor_floats: dict[torch.Tensor, tuple[int, float]] = {}
        # param -> (address, version) when its master copy last matched it
        self._master_marks: dict[torch.Tensor, tuple[int, int]] = {}
        # param -> the (amsgrad, master, device) its state was last conformed to (see _conform_state)
        self._conformed: dict[torch.Tensor, tuple] = {}
        self._live_rows = LiveRows()
        self.defer_untouched_rows = defer_untouched_rows
        self._deferred_rows = DeferredRows()

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for option in _GROUP_OPTIONS:
                group.setdefault(option, self.defaults[option])
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("max_grad_norm", 0.0)
        self.__dict__.setdefault("grad_norm", None)
        self.__dict__.setdefault("_tables", {})
        self.__dict__.setdefault("_betas64", {})
        self.__dict__.setdefault("_staging", StagingBuffers())
        self.__dict__.setdefault("_tensor_floats", {})
        self.__dict__.setdefault("_master_marks", {})
        self.__dict__.setdefault("defer_untouched_rows", False)
        self.__dict__.update(_conformed={}, _live_rows=LiveRows(), _deferred_rows=DeferredRows())

    def _master_mode(self, group: dict, param: torch.Tensor) -> bool:
        return bool(group["master_weights"]) and param.dtype in _LOW_PRECISION

    def _conform_state(self, param: torch.Tensor, state: dict, group: dict) -> None:
        """Fill in and convert the state a step needs: first-step zeros, the amsgrad maximum and master copy
        when those options are on, fp32 moments in master mode, everything on the parameter's device, and `step`
        as an fp32 scalar (a state dict loaded from torch's non-fused AdamW keeps it on the CPU: pytorch#103256)."""
        master = self._master_mode(group, param)
        moment_dtype = torch.float32 if master else param.dtype
        if "step" not in state:  # a first step (the state may hold a master put there already)
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
        step = state["step"]
        if not isinstance(step, torch.Tensor):
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=param.device)
        elif step.device != param.device or step.dtype != torch.float32 or step.ndim != 0:
            state["step"] = step.reshape(()).to(device=param.device, dtype=torch.float32)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", MASTER_KEY):
            dtype = torch.float32 if key == MASTER_KEY else moment_dtype
            value = state.get(key)
            if value is not None and (value.dtype != dtype or value.device != param.device):
                state[key] = value.to(device=param.device, dtype=dtype)  # e.g. after model.to(device)
        if master and MASTER_KEY not in state:
            state[MASTER_KEY] = param.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
            self._master_marks[param] = (param.data_ptr(), param._version)

    def _refresh_master(self, param: torch.Tensor, master: torch.Tensor) -> None:
        """Adopt changes made to a master-weights parameter since the optimizer last wrote it; elements where
        the parameter still equals its rounded master keep the master's extra precision."""
        mark = (param.data_ptr(), param._version)
        if self._master_marks.get(param) != mark:
            master.copy_(torch.where(master.to(param.dtype) == param, master, param.to(torch.float32)))
            self._master_marks[param] = mark

    def _buckets(self, group: dict) -> dict[tuple, list[torch.Tensor]]:
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if torch.is_complex(param):
                raise RuntimeError("FusedAdamW does not support complex parameters")
            state = self.state[param]
            master = self._master_mode(group, param)
            conformed = (group["amsgrad"], master, param.device)
            if not state or self._conformed.get(param) != conformed:
                self._conform_state(param, state, group)
                self._conformed[param] = conformed
            key = (param.device, param.dtype, grad.dtype, master)
            buckets.setdefault(key, []).append(param)
        return buckets

    def _entry(self, param: torch.Tensor, state: dict, master: bool) -> tuple[Entry, list[int]]:
        """The parameter's tensors and their table row, staged through contiguous copies unless they all share
        one dense layout and start on 16-byte boundaries (which the Triton kernel's vector accesses assume; fresh
        tensors do)."""
        grad = param.grad
        master_param = state[MASTER_KEY] if master else None
        if master:
            self._deferred_rows.reconcile(param)  # a write to the parameter seen before its master adopts it
            self._refresh_master(param, master_param)
        entry = Entry(param, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
                      master_param, state["step"])
        row = entry.row()
        aligned = not (row[0] | row[1] | row[2] | row[3] | row[4] | row[5]) % 16  # absent tensors' 0 is aligned
        if aligned and param.is_contiguous() and grad.is_contiguous() and entry.exp_avg.is_contiguous() \
                and entry.exp_avg_sq.is_contiguous() \
                and (entry.max_exp_avg_sq is None or entry.max_exp_avg_sq.is_contiguous()) \
                and (master_param is None or master_param.is_contiguous()):
            return entry, row
        # every tensor of the row takes the parameter's strides where it is dense, contiguous ones where not
        strides = dense_strides(param)
        staged_param = not is_dense(param) or param.data_ptr() % 16 != 0
        if staged_param:
            entry.param = self._staging.get(param, "param", strides, param.dtype).copy_(param)
        if grad.stride() != strides or grad.data_ptr() % 16:
            entry.grad = self._staging.get(param, "grad", strides, grad.dtype).copy_(grad)
        entry.staged = (param if staged_param else None, grad if entry.grad is not grad else None)
        # the state is ours: re-lay it out once rather than stage it every step
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", MASTER_KEY):
            value = state.get(key)
            if value is not None and (value.stride() != strides or value.data_ptr() % 16):
                state[key] = torch.empty_strided(param.shape, strides, dtype=value.dtype,
                                                 device=param.device).copy_(value)
        entry.exp_avg, entry.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        entry.max_exp_avg_sq, entry.master = state.get("max_exp_avg_sq"), state[MASTER_KEY] if master else None
        return entry, entry.row()

    def _host_float(self, value, name: str) -> float:
        """A hyperparameter as a float. A tensor (torch.optim.AdamW takes tensor betas) is read when first seen
        and again only after an in-place change: a read every step would wait for the device."""
        if not isinstance(value, torch.Tensor):
            return float(value)
        version, number = self._tensor_floats.get(value, (None, None))
        if version != value._version:
            version, number = self._tensor_floats[value] = (value._version, _scalar(value, name))
        return number

    def _betas_on(self, device: torch.device, beta1: float, beta2: float) -> torch.Tensor:
        key = (device, beta1, beta2)
        if key not in self._betas64:
            self._betas64[key] = to_device(torch.tensor([beta1, beta2], dtype=torch.float64), device)
        return self._betas64[key]

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not self.defer_untouched_rows:
            self._deferred_rows.clear()  # switched off since: every row up to date, none deferred
        buckets = [self._prepare((index, *key), group, params, grad_scale, found_inf)
                   for index, group in enumerate(self.param_groups) for key, params in self._buckets(group).items()]
        # every bucket's gradients are measured before any update unscales them
        clip_coef = self._clip_coefficient(buckets) if self.max_grad_norm > 0 and buckets else None
        for bucket in buckets:
            self._update(bucket, None if clip_coef is None else clip_coef.to(bucket.device))
        return loss

    def _prepare(self, key: tuple, group: dict, params: list[torch.Tensor], grad_scale, found_inf) -> Bucket:
        _, device, param_dtype, grad_dtype, master = key
        dtype_key = (param_dtype, "master") if master else param_dtype
        backend = dispatch.backend_for("adamw", device, dtype_key, backend=self.backend)
        if grad_dtype != param_dtype:  # the kernels read gradients in the parameter's dtype
            backend = "reference"
        beta1, beta2 = (self._host_float(beta, "betas") for beta in group["betas"])
        hyper = {"beta1": beta1, "beta2": beta2, "eps": self._host_float(group["eps"], "eps"),
                 "weight_decay": self._host_float(group["weight_decay"], "weight_decay"),
                 "amsgrad": bool(group["amsgrad"]), "maximize": bool(group["maximize"]),
                 "bias_correction": bool(group["bias_correction"])}
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
        entries, rows = zip(*(self._entry(p, self.state[p], master) for p in params))
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            # the kernels read it where it is, so a schedule can update it on the device; no copy when it is
            # already there, as a captured step needs
            lr = lr.detach().reshape(()).to(device)
        table = None
        if backend != "reference":
            rows = list(rows)
            table = self._tables.get(key)
            if table is None or table.rows != rows:
                block = None
                if backend == "triton":
                    from fastcls.kernels.adamw import block_size

                    block = block_size(device, max(r[-1] for r in rows))
                table = AddressTable(rows, device, block, table)
                self._tables[key] = table
        live_tables = self._live_rows.live_tables(params, entries, backend == "cpp" and self.row_sparse,
                                                  self._deferred_rows if self.defer_untouched_rows else None,
                                                  dtype_key)
        return Bucket(key, params, entries, backend, dtype_key, lr, hyper, grad_scale, found_inf, table, *live_tables)

    def _grad_sum_of_squares(self, bucket: Bucket) -> torch.Tensor:
        """The sum of the bucket's squared unscaled gradients, a 0-dim fp64 tensor on its device."""
        if bucket.backend == "reference":
            return grad_sum_of_squares_reference([e.grad for e in bucket.entries], bucket.grad_scale)
        if bucket.backend == "cpp":
            return cpp.adamw_grad_sum_of_squares(bucket.table.table, bucket.dtype_key, bucket.grad_scale,
                                                 bucket.grad_live_table)
        from fastcls.kernels.adamw import grad_sum_of_squares_triton

        table = bucket.table
        return grad_sum_of_squares_triton(table.table, table.chunk_tensor, table.chunk_index, bucket.entries[0].grad,
                                          table.sums, table.block, bucket.grad_scale)

    def _clip_coefficient(self, buckets: list[Bucket]) -> torch.Tensor:
        """clip_grad_norm_'s coefficient for the norm of every gradient the step updates, an fp32 scalar on the
        first bucket's device; the norm goes to `grad_norm` (kept at one address, so a captured step updates it)."""
        device = buckets[0].device
        total = torch.stack([self._grad_sum_of_squares(b).to(device) for b in buckets]).sum()
        norm = total.sqrt().to(torch.float32)
        if self.grad_norm is None or self.grad_norm.device != device:
            self.grad_norm = torch.empty((), dtype=torch.float32, device=device)
        self.grad_norm.copy_(norm)
        return torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)  # torch's expression, in fp32 as there

    def _update(self, bucket: Bucket, clip_coef: torch.Tensor | None) -> None:
        entries, grad_scale, found_inf = bucket.entries, bucket.grad_scale, bucket.found_inf
        if bucket.backend == "reference":
            adamw_reference(
                [e.param for e in entries], [e.grad for e in entries], [e.exp_avg for e in entries],
                [e.exp_avg_sq for e in entries], [e.max_exp_avg_sq for e in entries], [e.master for e in entries],
                [e.step for e in entries], lr=bucket.lr, grad_scale=grad_scale, found_inf=found_inf,
                clip_coef=clip_coef, **bucket.hyper)
        else:
            if bucket.backend == "cpp":
                cpp.adamw(bucket.table.table, bucket.dtype_key, lr=bucket.lr, grad_scale=grad_scale,
                          found_inf=found_inf, clip_coef=clip_coef, live_table=bucket.live_table, **bucket.hyper)
            else:
                self._launch_triton(bucket, clip_coef)
            # Kernel stores bypass autograd's version counters: bump them as an in-place torch update would, so
            # a backward that saved a parameter fails loudly and caches keyed on versions see the new values.
            torch.autograd.graph.increment_version(bucket.params)
            self._deferred_rows.written(bucket.params)
        for entry in entries:
            original_param, original_grad = entry.staged
            if original_param is not None:
                original_param.copy_(entry.param)
            if original_grad is not None and grad_scale is not None:
                original_grad.copy_(entry.grad)  # torch leaves the gradients unscaled
        if bucket.master:
            for param in bucket.params:
                self._master_marks[param] = (param.data_ptr(), param._version)

    def _launch_triton(self, bucket: Bucket, clip_coef: torch.Tensor | None) -> None:
        from fastcls.kernels.adamw import adamw_triton

        table, first, hyper = bucket.table, bucket.entries[0], bucket.hyper
        # the kernel addresses every tensor from these, which are 16-byte aligned like all the others
        bases = (first.param, first.grad, first.exp_avg, first.master if bucket.master else first.exp_avg)
        adamw_triton(
            table.table, table.chunk_tensor, table.chunk_index, table.tickets,
            self._betas_on(bucket.device, hyper["beta1"], hyper["beta2"]), bases, table.block, lr=bucket.lr,
            master=bucket.master, grad_scale=bucket.grad_scale, found_inf=bucket.found_inf, clip_coef=clip_coef,
            **hyper,
        )

    def sync_deferred_rows(self) -> None:
        """Bring every row that `defer_untouched_rows` left behind up to date (fastcls.optim.deferred_rows)."""
        self._deferred_rows.sync()

    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict, every deferred row brought up to date first."""
        self._deferred_rows.sync()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer.load_state_dict, keeping the fp32 moments and master copies of master-weights
        parameters in fp32 (the base class rounds floating state to the parameter's dtype) and moving `step`
        beside its parameter."""
        self._deferred_rows.clear()  # the rows as the steps so far left them, before the state is replaced
        saved_fp32 = {
            index: {key: value for key, value in saved.items()
                    if key != "step" and isinstance(value, torch.Tensor) and value.dtype == torch.float32}
            for index, saved in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        saved_ids = (index for group in state_dict["param_groups"] for index in group["params"])
        for group in self.param_groups:
            for param in group["params"]:
                index = next(saved_ids)
                state = self.state.get(param)
                if not state:
                    continue
                if self._master_mode(group, param):
                    for key, value in saved_fp32.get(index, {}).items():
                        state[key] = value.to(param.device)
                    self._master_marks[param] = (param.data_ptr(), param._version)
                self._conform_state(param, state, group)
        self._tables.clear()

