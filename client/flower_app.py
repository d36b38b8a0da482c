"""The Flower apps of federated training (DESIGN §7): thin wrappers round :mod:`semla.client.federated`.

Components, named by full import path in the Flower app's ``pyproject.toml``:
``semla.client.flower_app:server_app`` (the coordinator) and ``semla.client.flower_app:client_app``
(each owner). Both read their settings from the run config (:class:`RunSettings`); an owner's
SuperNode adds its node config: ``data`` (its private folder), optionally ``pretrained`` (where
its copy of the base weights lies) and ``require-secure-aggregation`` (refuse to send an
unmasked update).

**Wire format: the legacy fit messages, in both modes.** Flower 1.42's SecAgg+ exists only in the
legacy workflow API: ``SecAggPlusWorkflow`` is a fit step of ``DefaultWorkflow`` driven by a
legacy ``Strategy`` under a ``LegacyContext``, and ``secaggplus_mod`` on the ClientApp reads the
reply as a legacy ``FitRes`` (``recorddict_to_fitres``), masks its ``parameters`` and lets
``num_examples`` and ``metrics`` pass in the clear. So the ServerApp is a Message-API
``@server_app.main()`` that runs ``DefaultWorkflow`` (with ``fit_workflow=SecAggPlusWorkflow`` when
secure aggregation is on), the ClientApp a Message-API ``@client_app.train()`` that answers
with a ``FitRes`` record, and the plain mode uses the same path, so the two modes send the same
records and differ only in the masking.

A reply's parameters are one owner's :class:`~semla.client.federated.Contribution`, nothing
else: the LoRA tensors ``w·Δ`` in sorted peft-name order, then ``w`` (1,), the centroid sum
(D,) and the image count (1,). ``num_examples`` is the count in the plain mode and 1 under
secure aggregation (SecAgg+ weighs by it in the clear: the count travels masked instead, and
the weighting is ours); ``metrics`` is empty.

**Secure aggregation.** SecAgg+ quantises each value, clipped to [-1, 1], to an integer of
``QUANTIZATION_RANGE`` levels (stochastic rounding), masks it, and reveals only the sum
(divided by the number of participants, which the coordinator multiplies back). Every field is
therefore scaled into [-1, 1] by a public constant first (:func:`wire_scales`): counts,
weights and centroid sums by ``max_samples`` (an owner with more images refuses to take part),
the LoRA field ``n·Δ`` by ``max_samples`` too (so an entry of Δ is clipped only beyond
``max_samples / n`` ≥ 1 in one round) or, with DP, by ``clip_norm · (1 + 10σ/√min_clients)``
(clipped update plus ten standard deviations of an owner's noise share; a tail beyond that has
probability below 1e-22 per value).
Each key share goes to every other participant; a mask can be rebuilt from two thirds of them.
Caveats of Flower's implementation, stated plainly: its masks are drawn from numpy's
RandomState seeded with 32 bits folded from the shared secrets, which a coordinator willing to
search 2³² seeds per mask could attack; the stochastic rounding of the noised values is not
part of the DP accounting (its step, about 1e-7 of the scale, is far below the noise).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Parameters, Status, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from semla.client import federated as fed
from semla.registry.privacy import DEFAULT_DELTA
from semla.schemas.errors import InvalidInputError, SemlaError

__all__ = ["QUANTIZATION_RANGE", "RunSettings", "client_app", "decode", "encode", "server_app", "wire_scales"]

#: Integer levels of one value under SecAgg+: 2**24 keeps the masked sum of up to 255
#: participants below Flower's 2**32 modulus.
QUANTIZATION_RANGE = 2**24
MAX_SECURE_PARTICIPANTS = 2**32 // QUANTIZATION_RANGE - 1
_INFO, _WARNING = logging.INFO, logging.WARNING


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a federated run needs, as carried by Flower's run config (flat scalars)."""

    name: str
    out: str
    classes: tuple[str, ...]
    config: fed.FederatedConfig
    base: str = "semla-tiny"
    pretrained: str = ""
    max_samples: int = 10_000
    #: seconds the coordinator waits for ``min_clients`` owners to join
    join_timeout: float = 600.0
    #: seconds each SecAgg+ stage waits for replies
    round_timeout: float = 3600.0

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        c, dp = self.config, self.config.dp
        return {
            "name": self.name, "out": self.out, "classes": "\n".join(self.classes), "domain": c.domain or "",
            "rounds": c.rounds, "local-steps": c.local_steps, "min-clients": c.min_clients,
            "fraction": float(c.fraction), "secure-aggregation": c.secure_aggregation,
            "dp-clip": float(dp.clip_norm) if dp else 0.0, "dp-noise": float(dp.noise_multiplier) if dp else 0.0,
            "dp-delta": float(dp.delta) if dp else DEFAULT_DELTA,
            "rank": c.rank, "alpha": float(c.alpha), "lr": float(c.lr), "batch-size": c.batch_size, "seed": c.seed,
            "version": c.version, "min-samples": c.min_samples, "max-samples": self.max_samples,
            "base": self.base, "pretrained": self.pretrained,
            "join-timeout": float(self.join_timeout), "round-timeout": float(self.round_timeout),
        }

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "RunSettings":
        dp = None
        if float(rc["dp-clip"]) > 0:
            dp = fed.UpdateDP(float(rc["dp-clip"]), float(rc["dp-noise"]), float(rc["dp-delta"]))
        config = fed.FederatedConfig(
            rounds=int(rc["rounds"]), local_steps=int(rc["local-steps"]), min_clients=int(rc["min-clients"]),
            fraction=float(rc["fraction"]), secure_aggregation=bool(rc["secure-aggregation"]), dp=dp,
            rank=int(rc["rank"]), alpha=float(rc["alpha"]), lr=float(rc["lr"]), batch_size=int(rc["batch-size"]),
            seed=int(rc["seed"]), version=int(rc["version"]), min_samples=int(rc["min-samples"]),
            domain=str(rc["domain"]) or None,
        )
        return cls(name=str(rc["name"]), out=str(rc["out"]), classes=tuple(str(rc["classes"]).split("\n")),
                   config=config, base=str(rc["base"]), pretrained=str(rc["pretrained"]),
                   max_samples=int(rc["max-samples"]), join_timeout=float(rc["join-timeout"]),
                   round_timeout=float(rc["round-timeout"]))


# -- the wire format ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WireScales:
    """Public divisors that bring each field of a contribution into [-1, 1] for SecAgg+."""

    lora: float
    weight: float
    centroid: float
    count: float


def wire_scales(settings: RunSettings) -> WireScales | None:
    """The scales of the secure mode (None in the plain mode: values travel as float32)."""
    if not settings.config.secure_aggregation:
        return None
    s, dp = float(settings.max_samples), settings.config.dp
    if dp is None:
        return WireScales(lora=s, weight=s, centroid=s, count=s)
    lora = dp.clip_norm * (1.0 + 10.0 * dp.noise_multiplier / math.sqrt(settings.config.min_clients))
    return WireScales(lora=lora, weight=1.0, centroid=s, count=s)


def encode(part: fed.Contribution, scales: WireScales | None) -> list[np.ndarray]:
    """A contribution as the list of arrays of a ``FitRes``: LoRA tensors (sorted names), w, sum, n."""
    sc = scales or WireScales(1.0, 1.0, 1.0, 1.0)
    arrays = [part.lora[k] / sc.lora for k in sorted(part.lora)]
    arrays += [np.array([part.weight / sc.weight]), np.asarray(part.centroid_sum) / sc.centroid,
               np.array([part.count / sc.count])]
    return [a.astype(np.float32) for a in arrays]


def decode(arrays: list[np.ndarray], shapes: dict[str, tuple[int, ...]], dim: int,
           scales: WireScales | None) -> fed.Contribution:
    """Inverse of :func:`encode`, checking every shape and value (a malformed reply is refused).

    Raises:
        InvalidInputError: wrong number of arrays, a wrong shape, a NaN or infinite value.
    """
    names = sorted(shapes)
    expect = [shapes[k] for k in names] + [(1,), (dim,), (1,)]
    if len(arrays) != len(expect) or any(tuple(a.shape) != s for a, s in zip(arrays, expect, strict=True)):
        raise InvalidInputError("a contribution does not have the LoRA layout of this run")
    if not all(np.isfinite(a).all() for a in arrays):
        raise InvalidInputError("a contribution holds NaN or infinite values")
    sc = scales or WireScales(1.0, 1.0, 1.0, 1.0)
    a = [np.asarray(x, np.float64) for x in arrays]
    lora = {k: a[i] * sc.lora for i, k in enumerate(names)}
    n = len(names)
    return fed.Contribution(lora, float(a[n][0] * sc.weight), a[n + 1] * sc.centroid, float(a[n + 2][0] * sc.count))


@functools.lru_cache(maxsize=1)
def _base(arch: str, pretrained: str | None):  # noqa: ANN202 - DenseClip, imported lazily (torch)
    """The frozen base, loaded once per process (both apps leave it unchanged)."""
    from semla.registry.model import load_base

    return load_base(arch, pretrained)


def _ndarrays(state: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(state[k], np.float32) for k in sorted(state)]


# -- the coordinator --------------------------------------------------------------------------------
class _LoraStrategy(Strategy):
    """The legacy strategy driven by ``DefaultWorkflow``: samples owners, turns the replies (or the
    SecAgg+ sum) into the next global LoRA tensors with :mod:`semla.client.federated`."""

    def __init__(self, settings: RunSettings, state: dict, fingerprint: str, dim: int) -> None:
        self.settings = settings
        self.state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.fingerprint = fingerprint
        self.dim = dim
        self.total: fed.Contribution | None = None
        self.participants: set[int] = set()
        self.rounds_done = 0
        self.asked: dict[int, int] = {}  # round -> owners sampled

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(_ndarrays(self.state))

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        config = self.settings.config
        deadline = time.monotonic() + self.settings.join_timeout
        while client_manager.num_available() < config.min_clients:  # each call refreshes the node list
            if time.monotonic() > deadline:
                raise SemlaError(f"only {client_manager.num_available()} of the {config.min_clients} owners needed "
                                 f"joined within {self.settings.join_timeout:.0f} s", code="too_few_owners")
            time.sleep(0.5)
        k = fed.participants_per_round(client_manager.num_available(), config, server_round)
        if config.secure_aggregation and k > MAX_SECURE_PARTICIPANTS:
            k = MAX_SECURE_PARTICIPANTS
        clients = client_manager.sample(k, min_num_clients=config.min_clients)
        self.asked[server_round] = len(clients)
        fit_config = {"round": server_round, "participants": len(clients), "fingerprint": self.fingerprint}
        log(_INFO, "round %d/%d: %d owners", server_round, config.rounds, len(clients))
        return [(c, FitIns(parameters, dict(fit_config))) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict]:
        config, scales = self.settings.config, wire_scales(self.settings)
        missing = self.asked.get(server_round, len(results)) - len(results)
        # a timed-out owner shows up in neither list: count against what configure_fit asked for
        if missing > 0 and config.secure_aggregation and config.dp is not None:
            raise SemlaError(f"round {server_round}: {missing} owner(s) dropped out; the distributed DP "
                             "noise was calibrated for all participants, so the round is discarded",
                             code="federation_failed")
        if missing > 0 and server_round == config.rounds:
            raise SemlaError(f"final round: {missing} owner(s) dropped out; the published centroid and sample "
                             "count must cover every owner asked, so the round is discarded",
                             code="federation_failed")
        if len(results) < config.min_clients:
            reasons = "; ".join(sorted({_reason(f) for f in failures}))
            raise SemlaError(f"round {server_round}: {len(results)} owner(s) answered, {config.min_clients} needed; "
                             f"{len(failures)} failed: {reasons}", code="federation_failed")
        if config.secure_aggregation:  # every result carries the same unmasked mean over the participants
            mean = parameters_to_ndarrays(results[0][1].parameters)
            total = decode([a * len(results) for a in mean], self.shapes, self.dim, scales)
        else:
            parts, accepted = [], []
            for proxy, res in results:
                try:
                    parts.append(decode(parameters_to_ndarrays(res.parameters), self.shapes, self.dim, None))
                    accepted.append((proxy, res))
                except InvalidInputError as exc:
                    log(_WARNING, "round %d: refused the reply of node %s: %s", server_round, proxy.node_id, exc)
            results = accepted
            if len(parts) < config.min_clients:
                raise SemlaError(f"round {server_round}: {len(parts)} valid replies, {config.min_clients} needed",
                                 code="federation_failed")
            total = fed.sum_contributions(parts, clip_norm=config.dp.clip_norm if config.dp else None)
        self.state = fed.aggregate(self.state, total, dp=config.dp, add_noise=not config.secure_aggregation)
        self.total = total
        self.rounds_done += 1
        self.participants.update(proxy.node_id for proxy, _ in results)
        log(_INFO, "round %d/%d aggregated: %d owners, %d images", server_round, config.rounds, len(results),
            round(total.count))
        return ndarrays_to_parameters(_ndarrays(self.state)), {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


def _reason(failure: Any) -> str:
    """The owner's own error message out of a failed reply (Flower wraps it twice)."""
    error = failure.args[0] if isinstance(failure, Exception) and failure.args else failure
    return str(getattr(error, "reason", error))


server_app = ServerApp()


@server_app.main()
def _coordinate(grid: Grid, context: Context) -> None:
    """Run every round, then write the unsigned bundle to the run config's ``out``."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    config = settings.config
    if Path(settings.out).exists():
        raise InvalidInputError(f"{settings.out} already exists")
    model = _base(settings.base, settings.pretrained or None)
    state, adapter_config = fed.initial_lora(model, config.rank, config.alpha, config.seed)
    blank = np.zeros((model.image_size, model.image_size, 3), np.uint8)
    dim = int(model.embed(model.pixels([blank])).shape[-1])  # the size of every centroid sum
    strategy = _LoraStrategy(settings, state, model.ref.fingerprint, dim)
    fit_workflow = None
    if config.secure_aggregation:
        fit_workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=1.0,
                                          clipping_range=1.0, quantization_range=QUANTIZATION_RANGE,
                                          timeout=settings.round_timeout)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    if strategy.rounds_done != config.rounds:  # e.g. SecAgg+ halted a round for lack of owners
        raise SemlaError(f"only {strategy.rounds_done} of {config.rounds} rounds were aggregated",
                         code="federation_failed")
    manifest = fed.build_federated_bundle(
        Path(settings.out), model=model, state=strategy.state, adapter_config=adapter_config, name=settings.name,
        config=config, classes=settings.classes, total=strategy.total, participants=len(strategy.participants),
    )
    log(_INFO, "wrote %s (%s, %d images from %d owners)", settings.out, manifest.name, manifest.sample_count,
        len(strategy.participants))


# -- an owner ---------------------------------------------------------------------------------------
def _secure_aggregation_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
    """SecAgg+ on every fit message of a secure run; refuse a plain run if the owner demands it."""
    secure = bool(context.run_config.get("secure-aggregation", False))
    if not secure and bool(context.node_config.get("require-secure-aggregation", False)):
        raise InvalidInputError("this owner requires secure aggregation; the coordinator runs without it")
    return secaggplus_mod(msg, context, call_next) if secure else call_next(msg, context)


client_app = ClientApp(mods=[_secure_aggregation_mod])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """One round on this owner's private folder; the reply holds one contribution and nothing else."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    config = settings.config
    secure = RECORD_KEY_CONFIGS in msg.content.config_records  # set by the SecAgg+ stages only
    if config.secure_aggregation != secure:
        raise InvalidInputError("the fit message does not match the run's secure-aggregation setting")
    data = context.node_config.get("data")
    if not data:
        raise InvalidInputError("this SuperNode has no node config 'data' (the owner's private folder)")
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    model = _base(settings.base, str(context.node_config.get("pretrained", "")) or settings.pretrained or None)
    if model.ref.fingerprint != fitins.config["fingerprint"]:
        raise InvalidInputError("this owner's base model differs from the coordinator's (fingerprint mismatch)")
    owner = fed.load_owner(model, data, classes=settings.classes, min_samples=config.min_samples)
    if secure and owner.count > settings.max_samples:
        raise InvalidInputError(f"{owner.count} images exceed the run's max-samples {settings.max_samples}")
    names = sorted(fed.initial_lora(model, config.rank, config.alpha, config.seed)[0])
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise InvalidInputError("the global LoRA tensors do not fit this run's rank and base model")
    global_state = dict(zip(names, arrays, strict=True))
    round_ = int(fitins.config["round"])
    local, count = fed.local_update(model, owner, global_state, config, round_=round_,
                                    seed=fed.local_seed(config.seed, round_, context.node_id))
    part = fed.contribute(global_state, local, owner.centroid_sum, count, dp=config.dp,
                          noise_share=int(fitins.config["participants"]) if secure else None)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(encode(part, wire_scales(settings))),
                    num_examples=1 if secure else count, metrics={})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
