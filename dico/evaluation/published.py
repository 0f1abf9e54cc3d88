"""Our scores beside a release's published ones, only when every setting that changes the number is the published
protocol's; otherwise "not comparable: <what differs>".

The published figures (DiCo's README and Table 1, DiT's Tables 2 and 4) are FID-50K and IS from ADM's evaluator:
Inception-v3 features (``inception-v3-compat``) against ADM's reference batch of the resolution with its own
statistics (``VIRTUAL_imagenet256_labeled.npz``, ``VIRTUAL_imagenet512.npz``), ADM's metric conventions, 50,000
samples with labels drawn uniformly at random (``sample_ddp.py``), 250-step iDDPM, guidance on the first three
channels (``official``) at the release's scale, from the release's own (EMA) weights in float32, decoded by the VAE
the models were trained with (``sd-vae-ft-ema``). A record (``evaluate``'s or the test protocol's) says all of these:
``feature_extractor`` and ``feature_weights_file_sha256`` (the Inception file by content, not by name),
``reference`` (file, statistics, image count, resolution), ``conventions``, ``settings`` and ``sample_job`` (the
release sampled, whether its weights were the EMA ones, ``precision`` and ``decoder``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .fidelity import INCEPTION, INCEPTION_FILE, INCEPTION_SHA256
from .reference import ADM_STATISTICS

ADM_REFERENCE_BATCHES = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}
ADM_REFERENCE_COUNT = 10_000  # ADM: "statistics over the whole dataset, as well as 10,000 images" (its arr_0)
PUBLISHED_PRECISION = ("32-true", "32")  # sample_ddp.py samples in float32
ADM_OWN_STATISTICS = "the batch's own mu/sigma and mu_s/sigma_s (ADM)"
PUBLISHED_SETTINGS = {
    "num_samples": 50_000,
    "sampler": "iddpm",
    "steps": 250,
    "labels": "uniform",
    "guidance_mode": "official",
}


def find_release(name: str | None) -> Any:
    """The catalogue entry of a release name or a file named as released (None if none)."""
    from dico.pretrained import find_release as find  # the catalogue (data only); imported where it is needed

    return find(name)


def differences(release: Any, record: Mapping[str, Any]) -> list[str]:
    """Every setting of ``record`` that changes FID/IS and is not the published protocol of ``release``."""
    out = []
    extractor = record.get("feature_extractor")
    if extractor != INCEPTION:
        out.append(f"feature extractor {extractor} (published: {INCEPTION})")
    elif (sha := record.get("feature_weights_file_sha256")) != INCEPTION_SHA256:
        out.append(f"Inception weights file sha256 {sha} (published: {INCEPTION_FILE}, sha256 {INCEPTION_SHA256})")
    out += _reference_differences(release, record.get("reference") or {})
    convention = (record.get("conventions") or {}).get("convention")
    if convention != "adm":
        out.append(f"metric convention {convention} (published: adm, ADM's evaluator)")
    settings = record.get("settings")
    if not settings:
        out.append("sample settings unknown (no samples.json of these samples beside them)")
        return out + _sample_job_differences(release, record.get("sample_job"))
    for key, published in PUBLISHED_SETTINGS.items():
        ours = settings.get(key)
        if key == "guidance_mode" and (release.cfg_scale == 1.0 or settings.get("cfg_scale") == 1.0):
            continue  # unguided: the mode does nothing
        if ours != published:
            out.append(f"{key} {ours} (published: {published})")
    cfg = settings.get("cfg_scale")
    if cfg is None or abs(cfg - release.cfg_scale) > 1e-9:
        out.append(f"cfg_scale {cfg} (published: {release.cfg_scale})")
    return out + _sample_job_differences(release, record.get("sample_job"))


def _reference_differences(release: Any, ref: Mapping[str, Any]) -> list[str]:
    """ADM's batch of the release's resolution by what it holds: its file name, its own statistics (with sFID's),
    its 10,000 images and their resolution (a subset of the batch, or the 512 batch renamed, differ)."""
    size = release.image_size
    batch = ADM_REFERENCE_BATCHES.get(size, f"ADM's {size}x{size} batch")
    out = []
    if Path(str(ref.get("source"))).name != batch or ref.get("statistics") != ADM_OWN_STATISTICS:
        out.append(
            f"reference {ref.get('source')} ({ref.get('statistics')}; published: {batch} with its own "
            f"{'/'.join(ADM_STATISTICS)})"
        )
    if ref.get("count") != ADM_REFERENCE_COUNT:
        out.append(f"reference of {ref.get('count')} images (published: {batch}'s {ADM_REFERENCE_COUNT})")
    if list(ref.get("image_size") or []) != [size, size]:
        out.append(f"reference resolution {ref.get('image_size')} (published: {size}x{size})")
    return out


def _sample_job_differences(release: Any, job: Mapping[str, Any] | None) -> list[str]:
    """The samples are the release's, from its EMA weights, sampled in float32 and decoded by the release's VAE."""
    from dico.pretrained import SD_SCALE_FACTOR, SD_VAE  # the catalogue module; imported where it is needed

    if not job:
        return ["what sampled them unknown (no record of the sample job: release, weights, precision, VAE)"]
    out = []
    if job.get("pretrained") != release.name:
        made = job.get("pretrained") or (job.get("checkpoint") or {}).get("path") or job.get("ckpt")
        out.append(f"samples of {made} (compared with: the release {release.name})")
    if job.get("ema") is not True:
        out.append(f"EMA weights {job.get('ema')} (published: the release's EMA weights)")
    if str(job.get("precision")) not in PUBLISHED_PRECISION:
        out.append(f"precision {job.get('precision')} (published: {PUBLISHED_PRECISION[0]})")
    decoder = job.get("decoder") or {}
    vae = str(decoder.get("vae"))
    hub_copy = "models--" + SD_VAE.replace("/", "--") in Path(vae).parts  # its Hugging Face cache folder
    if (vae != SD_VAE and not hub_copy) or decoder.get("scale_factor") != SD_SCALE_FACTOR:
        out.append(
            f"VAE {decoder.get('vae')} x {decoder.get('scale_factor')} (published: {SD_VAE} x {SD_SCALE_FACTOR})"
        )
    return out


def comparison(release: Any, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"release", "published", "comparable", "differences", "line"}`` for ``record`` against ``release`` (a
    catalogue entry or name); None when there is no published figure."""
    release = find_release(release) if isinstance(release, str) else release
    if release is None or release.fid is None:
        return None
    metrics = record["metrics"]
    fid = max(metrics["frechet_inception_distance"], 0.0)  # not -0.00 from rounding error of equal statistics
    score = metrics.get("inception_score_mean")
    differ = differences(release, record)
    published = {"fid": release.fid, "inception_score": release.inception_score, "source": release.source}
    if differ:
        ours = f"FID {fid:.2f}" + (f", IS {score:.2f}" if score is not None else "")
        line = f"{release.name}: {ours}; not comparable with the published figures: {'; '.join(differ)}"
    else:
        parts = [f"FID {fid:.2f} (published {release.fid:.2f})"]
        if score is not None and release.inception_score is not None:
            parts.append(f"IS {score:.2f} (published {release.inception_score:.2f})")
        line = f"{release.name}: {', '.join(parts)}; the published protocol [{release.source}]"
    return {
        "release": release.name,
        "published": published,
        "comparable": not differ,
        "differences": differ,
        "line": line,
    }


def release_of_samples(record: Mapping[str, Any], named: str | None = None) -> str | None:
    """``evaluate``: the release named, or the one the sample job (``samples.json``) sampled."""
    return named or (record.get("sample_job") or {}).get("pretrained")


def release_of_test(trainer: Any, module: Any) -> Any:
    """``test``: the release the module's weights are, when they are a release's (not when a Lightning checkpoint,
    e.g. a fine-tuned one, was restored)."""
    source = getattr(module, "weights_source", None)
    if source is None or trainer.ckpt_path:
        return None
    return source.released
