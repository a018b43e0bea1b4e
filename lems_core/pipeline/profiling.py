"""The profile of (model, calibration, decomposition): spectra, measured single-layer KL, the bias fit.

``build_profile`` computes it once and caches it under a key of everything it depends on
(``ProfileSettings.key``); ``add_measured_points`` grows an existing one with more KL
points without changing its key. Under torchrun the per-layer work is sharded across
ranks and rank 0 writes the profile (``distributed.py``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__, distributed
from ..allocators import BIAS_FIT_RATIOS, profile_bias_fit
from ..blocks import plan_input_placement
from ..cache import key_of, profiles_dir
from ..calibration import CalibrationConfig
from ..decompositions import DecompositionOptions, base_of, check_decomposition
from ..model import LoadedModel, compressible_layers
from ..profile import Profile, ProfileError
from ..run import DEFAULT_RUN, Run
from ..sensitivity import SweepOptions, layer_kl_sweep
from .artefacts import calibration_windows, factorizations_for, options_dict, profile_loaded, profile_model, streamed_folder
from . import models
from .models import hold_model
from .scoring import make_kl_scorer


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile measures besides its spectra; all of it enters the profile's key.

    ``ref_ratio``: the reference single-layer KL point; ``extra_ratios``: more points (e.g.
    ASVD's 0.4..0.9); ``measure_scale``: whether the KL sweep runs at all; ``options``: the
    decomposition's; ``bias_fit_ratios``: where the reference LEMS's (alpha, gamma) search
    runs when the scale is measured (10 seeded trials each, scored by KL on the search
    windows, ``allocators.lems.profile_bias_fit``; empty: skip).
    """

    extra_ratios: tuple[float, ...] = ()
    ref_ratio: float = 0.1
    measure_scale: bool = True
    options: DecompositionOptions = field(default_factory=DecompositionOptions)
    bias_fit_ratios: tuple[float, ...] = BIAS_FIT_RATIOS

    @property
    def fits_bias(self) -> bool:
        """Whether the build runs the bias fit (it needs the measured scale)."""
        return bool(self.bias_fit_ratios) and self.measure_scale

    def key(self) -> dict:
        """The settings as the profile's key and ``meta["settings"]`` record them (the default fit stays out)."""
        settings = {"ref_ratio": self.ref_ratio, "extra_ratios": sorted(self.extra_ratios),
                    "scale": self.measure_scale, "options": options_dict(self.options)}
        if tuple(self.bias_fit_ratios) != BIAS_FIT_RATIOS:
            settings["bias_fit_ratios"] = sorted(self.bias_fit_ratios)
        return settings


@dataclass
class _Measured:
    """What a build measured: spectra, KL and single-layer NLL per ratio, the dense numbers, the KL floor."""

    spectra: dict[str, np.ndarray]
    sweep: dict = field(default_factory=dict)
    nll: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    floor: dict | None = None


def build_profile(source: str | LoadedModel, decomposition: str, calibration: CalibrationConfig,
                  settings: ProfileSettings = ProfileSettings(), *, search_batch: int = 4, force: bool = False,
                  run: Run = DEFAULT_RUN) -> Path:
    """Compute (or reuse) the profile for (model, calibration, decomposition); return its folder.

    ``search_batch`` windows run per batch of the KL sweep; ``force`` rebuilds a cached
    profile. ``run.max_memory`` bounds statistics + decomposition (bytes, default: what
    the device has; ``streaming.py``) and where the sweep's block inputs wait; it does
    not enter the profile's key (the profile is the same to float tolerance).
    """
    check_decomposition(decomposition)
    loaded = source if isinstance(source, LoadedModel) else models.get_model(source, run.device, offload=run.offload)
    folder = profiles_dir(run.cache_dir) / key_of(loaded.fingerprint, calibration.to_dict(), decomposition,
                                                  settings.key())
    ctx = distributed.context()
    if not force and distributed.broadcast_object(ctx, _profile_readable(folder, settings.fits_bias)):
        return folder  # under torchrun rank 0 decides, so no rank waits alone in a merge
    with hold_model(loaded, run=run):
        started = time.perf_counter()
        calib_ids, search_ids = calibration_windows(loaded, calibration)
        run.check_cancel()
        owned = distributed.owned_layers(compressible_layers(loaded.model), ctx)  # None in a single process
        factors = factorizations_for(loaded, calibration, base_of(decomposition), settings.options, calib_ids, owned,
                                     run=run.stage(0, 0.4))  # rank-dependent methods profile their base spectra
        measured = _measure(loaded, factors, search_ids, settings, owned, search_batch,
                            run.stage(0.4, 0.9 if settings.fits_bias else 1.0))
        if ctx.world > 1:  # rank 0 merges every rank's layers and writes the one profile
            measured, factors = _merge_at_main(ctx, loaded, calibration, decomposition, settings, factors, measured, run)
            if measured is None:
                return folder
        profile = _assemble(loaded, decomposition, calibration, settings, measured, started, run)
        if settings.fits_bias:  # under torchrun: on rank 0, with every layer's factors
            scorer = make_kl_scorer(loaded, factors, search_ids, run=run)
            profile.bias_fit = profile_bias_fit(profile, scorer, settings.bias_fit_ratios,
                                                progress=run.stage(0.9, 1.0).progress)
        profile.save(folder)
        distributed.barrier(ctx)
    run.report(1.0, "profile saved")
    return folder


def _profile_readable(folder: Path, expects_fit: bool = False) -> bool:
    """A valid profile is there; with ``expects_fit``, not one a torchrun build wrote without its bias fit
    (multi-process builds once skipped the fit under the same key)."""
    with contextlib.suppress(ProfileError):
        profile = Profile.load(folder)
        return not (expects_fit and profile.bias_fit is None and profile.meta.get("world_size", 1) > 1)
    return False


def _measure(loaded: LoadedModel, factors, search_ids: torch.Tensor, settings: ProfileSettings,
             owned: set[str] | None, search_batch: int, run: Run) -> _Measured:
    """The spectra, and with the scale measured the KL sweep of this rank's layers (all of them in one process)."""
    spectra = getattr(factors, "spectra", None) or {n: f.sigma for n, f in factors.items()}
    if not settings.measure_scale:
        return _Measured(spectra)
    ratios = [settings.ref_ratio, *sorted(set(settings.extra_ratios) - {settings.ref_ratio})]
    placement = plan_input_placement(loaded.model, search_ids, run.max_memory, loaded.device)
    swept = layer_kl_sweep(loaded.model, compressible_layers(loaded.model), lambda l: factors[l.name], search_ids,
                           ratios, SweepOptions(batch_size=search_batch, only=owned, with_nll=True), placement, run=run)
    ref = swept.reference
    floor = {"kl": ref.floor, "reference_precision": ref.precision, "search_windows": int(search_ids.shape[0]),
             "seq_len": int(search_ids.shape[1])}
    return _Measured(spectra, swept.kl, swept.nll, {"search_nll": ref.nll, "search_ppl": ref.ppl}, floor)


def _merge_at_main(ctx: distributed.DistContext, loaded: LoadedModel, calibration: CalibrationConfig,
                   decomposition: str, settings: ProfileSettings, factors, measured: _Measured, run: Run):
    """(every rank's measurements, every layer's factors when the bias fit needs them) at rank 0.

    Other ranks wait at the closing barrier and get (None, their factors).
    """
    keyed = {**measured.sweep, **{("nll", r): v for r, v in measured.nll.items()}}
    merged = distributed.merge_at_main(ctx, measured.spectra, keyed)
    if settings.fits_bias:  # each rank holds only its layers' factors: rank 0 gathers all of them once, for the fit
        complete = streamed_folder(loaded, calibration, base_of(decomposition), settings.options, run)
        factors = distributed.gather_factors_at_main(ctx, compressible_layers(loaded.model), factors,
                                                     merged and merged[0], complete, run.factor_dtype, loaded.device)
    if not ctx.main:
        distributed.barrier(ctx)
        return None, factors
    spectra, both = merged
    sweep = {r: v for r, v in both.items() if not isinstance(r, tuple)}
    nll = {r[1]: v for r, v in both.items() if isinstance(r, tuple)}
    return _Measured(spectra, sweep, nll, measured.dense, measured.floor), factors


def _assemble(loaded: LoadedModel, decomposition: str, calibration: CalibrationConfig, settings: ProfileSettings,
              measured: _Measured, started: float, run: Run) -> Profile:
    """The Profile of the measurements; the reference point's KL is ``kl_ref``, the others are ``measured``."""
    sweep, nll, kl_ref = dict(measured.sweep), dict(measured.nll), None
    if settings.measure_scale:
        kl_ref = sweep.pop(settings.ref_ratio)
        nll.pop(settings.ref_ratio, None)  # kept at the extra points only (ASVD's search points)
    meta = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": settings.key(),
            "seconds": round(time.perf_counter() - started, 1), "lems_version": __version__,
            "torch": torch.__version__, "device": str(loaded.device),
            "max_memory": run.max_memory, "world_size": distributed.context().world}
    return Profile(model_source=loaded.source, fingerprint=loaded.fingerprint, decomposition=decomposition,
                   calibration=calibration.to_dict(), layers=compressible_layers(loaded.model),
                   spectra=measured.spectra, ref_ratio=settings.ref_ratio, kl_ref=kl_ref, measured=sweep,
                   dense=measured.dense, meta=meta, kl_floor=measured.floor, measured_nll=nll)


def add_measured_points(folder: Path, ratios: tuple[float, ...], search_batch: int = 4, *,
                        run: Run = DEFAULT_RUN) -> Profile:
    """Measure more single-layer KL points (e.g. ASVD's 0.4..0.9) into an existing profile.

    Lets a quick profile (reference point only) grow later without recomputing it.
    """
    profile = Profile.load(folder)
    # a point measured before the NLL was recorded is measured again, for ASVD's reference search
    new = sorted(r for r in set(ratios) - {profile.ref_ratio} if r not in profile.measured or r not in profile.measured_nll)
    if not new:
        return profile
    loaded = profile_loaded(profile, run)
    with hold_model(loaded, run=run):
        loaded, search_ids, factors = profile_model(profile, run=run.stage(0, 0.1))
        swept = layer_kl_sweep(loaded.model, profile.layers, lambda l: factors[l.name], search_ids, new,
                               SweepOptions(batch_size=search_batch, with_nll=True), run=run.stage(0.1, 1.0))
    profile.measured.update(swept.kl)
    profile.measured_nll.update(swept.nll)
    profile.save(folder)
    return profile

