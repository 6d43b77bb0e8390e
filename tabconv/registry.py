"""The results registry: one record per published claim (docs/claims.json), the tables and inline numbers of
README.md and docs/*.md rendered from it, and a claim's evaluation re-run against its record.

Why: numbers re-typed in prose drift from the files the commands wrote. Here every published number has one
home; `python -m tabconv.registry render` rewrites the generated parts of the documents, and
`python -m tabconv reproduce CLAIM` measures a claim again.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tabconv.atomic import atomic_write_text
from tabconv.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "docs" / "claims.json"
KINDS = ("accuracy", "speed", "benchmark")
ACCURACY_FIELDS = ("images", "images_which", "held_out", "accuracy", "accuracy_ci95", "baseline_accuracy",
                   "retention")
TOLERANCE = 1e-9  # evaluation is deterministic: a re-run gives the recorded accuracy


class ClaimError(ValueError):
    """A registry, claim or document that is not what it should be; the message is one line."""


@dataclass(frozen=True)
class Latency:
    """A measured time of the exact and the tabled network, from one run."""

    runtime: str
    batch: int
    threads: int
    machine: str
    exact_ms: float
    tabled_ms: float

    @property
    def speedup(self) -> float:
        return self.exact_ms / self.tabled_ms


@dataclass(frozen=True)
class Claim:
    """One published claim and where it comes from.

    `source` is the file a command wrote the numbers to (or "prose: ..." for a number only prose kept); `command`
    measures it again; `checkpoint_from` says how the checkpoint (`checkpoint_sha256`, its weights' hash) is made.
    Accuracy claims say which test images (`images_which`, "test FIRST-LAST") and whether they were `held_out` from
    choosing the configuration. FLOP reductions are fractions of the exact network's FLOPs, paper convention
    (encoding free) and full (encoding counted); negative is an increase. `latency` holds measured times by
    "RUNTIME-bBATCH"; `values` any other measured number, its unit in its name's suffix (`_s`, `_ms`, `_gb`, `_pct`,
    `_x`), and `tags` (e.g. "headline": the README's table).
    """

    id: str
    title: str
    kind: str
    group: str
    model: str
    dataset: str
    source: str
    note: str
    command: str | None = None
    config: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_from: str | None = None
    tables_sha256: str | None = None
    commit: str | None = None
    images: int | None = None
    images_which: str | None = None
    held_out: bool | None = None
    accuracy: float | None = None
    accuracy_ci95: tuple[float, float] | None = None
    baseline_accuracy: float | None = None
    retention: float | None = None
    flops_reduction_paper: float | None = None
    flops_reduction_full: float | None = None
    storage_bytes: int | None = None
    baseline_storage_bytes: int | None = None
    paper_reduction: float | None = None
    latency: dict[str, Latency] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def first_image(self) -> int:
        """The first test image of `images_which` ("test 1000-9999" -> 1000)."""
        return _test_range(self.id, self.images_which)[0]

    @property
    def rerunnable(self) -> bool:
        return self.config is not None and self.checkpoint_sha256 is not None and self.kind == "accuracy"


REQUIRED = ("id", "title", "kind", "group", "model", "dataset", "source", "note")


def _test_range(claim_id: str, which: str | None) -> tuple[int, int]:
    match = re.fullmatch(r"test (\d+)-(\d+)", which or "")
    if not match:
        raise ClaimError(f"claim {claim_id!r}: images_which {which!r} is not 'test FIRST-LAST'")
    return int(match[1]), int(match[2])


def claim_from_dict(data: Mapping[str, Any], where: str = str(REGISTRY)) -> Claim:
    """A checked Claim; a missing or unknown field is a one-line error naming it."""
    name = data.get("id", "?")
    known = {f.name for f in fields(Claim)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClaimError(f"{where}: claim {name!r} has an unknown field {unknown[0]!r}")
    required = REQUIRED + (ACCURACY_FIELDS if data.get("kind") == "accuracy" else ())
    for key in required:
        if data.get(key) is None:
            raise ClaimError(f"{where}: claim {name!r} is missing the required field {key!r}")
    if not re.fullmatch(r"[\w-]+", str(name)):
        raise ClaimError(f"{where}: claim id {name!r} may hold only letters, digits, '-' and '_'")
    if data["kind"] not in KINDS:
        raise ClaimError(f"{where}: claim {name!r} has kind {data['kind']!r}, not one of {', '.join(KINDS)}")
    values = dict(data)
    values["latency"] = {key: Latency(**entry) for key, entry in (data.get("latency") or {}).items()}
    if data.get("accuracy_ci95") is not None:
        values["accuracy_ci95"] = tuple(data["accuracy_ci95"])
    claim = Claim(**values)
    if claim.kind == "accuracy":
        first, last = _test_range(claim.id, claim.images_which)
        if last - first + 1 != claim.images:
            raise ClaimError(f"{where}: claim {name!r}: {claim.images_which} is not {claim.images} images")
    return claim


def claim_to_dict(claim: Claim) -> dict[str, Any]:
    """The claim as the registry stores it (empty fields left out)."""
    out: dict[str, Any] = {}
    for f in fields(Claim):
        value = getattr(claim, f.name)
        if f.name == "latency":
            value = {key: vars(entry) for key, entry in value.items()}
        if f.name == "accuracy_ci95" and value is not None:
            value = list(value)
        if value is None or value == {}:
            continue
        out[f.name] = value
    return out


def load(path: str | Path = REGISTRY) -> dict[str, Claim]:
    """Every claim of the registry by id, in file order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClaimError(f"{path}: no such registry file") from None
    except json.JSONDecodeError as exc:
        raise ClaimError(f"{path}: not JSON ({exc})") from None
    claims: dict[str, Claim] = {}
    for entry in data.get("claims", []):
        claim = claim_from_dict(entry, str(path))
        if claim.id in claims:
            raise ClaimError(f"{path}: claim {claim.id!r} appears twice")
        claims[claim.id] = claim
    return claims


def save(claims: Iterable[Claim], path: str | Path = REGISTRY) -> None:
    data = {"schema": "tabconv-claims", "schema_version": 1, "claims": [claim_to_dict(c) for c in claims]}
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def get(claims: Mapping[str, Claim], claim_id: str) -> Claim:
    if claim_id not in claims:
        close = difflib.get_close_matches(claim_id, list(claims), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ClaimError(f"no claim {claim_id!r} in the registry{hint}")
    return claims[claim_id]


# -- formatting -----------------------------------------------------------------------------------------
def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def reduction(value: float | None, digits: int = 1) -> str:
    """A FLOP reduction; a negative one is an increase, said as such."""
    return "-" if value is None else f"{100 * value:.{digits}f}%" if value >= 0 else f"+{-100 * value:.{digits}f}%"


def times(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}x"


UNITS: dict[str, Callable[[float, int], str]] = {
    "pct": pct, "x": times, "ms": lambda v, d: f"{v:.{d}f} ms", "s": lambda v, d: f"{v:.{d}f} s",
    "gb": lambda v, d: f"{v:.{d}f} GB", "mb": lambda v, d: f"{v / 1e6:.{d}f} MB", "n": lambda v, d: f"{v:,.{d}f}",
}
DEFAULT_DIGITS = {"pct": 1, "x": 2, "ms": 2, "s": 2, "gb": 1, "mb": 1, "n": 0}


def _unit(path: str) -> str:
    """How a value is written, from its name: accuracy 2 decimals, ratios 'x', `*_ms` in ms, ..."""
    last = path.rsplit(".", 1)[-1]
    if last in ("accuracy", "baseline_accuracy", "retention") or last.endswith("_pct"):
        return "pct"
    if last in ("speedup", "ratio") or last.endswith("_x"):
        return "x"
    if last in ("storage_bytes", "baseline_storage_bytes") or last.endswith("_bytes"):
        return "mb"
    for suffix in ("ms", "s", "gb"):
        if last.endswith("_" + suffix):
            return suffix
    return "n"


def value_of(claim: Claim, path: str) -> Any:
    """`accuracy`, `values.toggle_p95_s`, `latency.pytorch-b64.speedup`, `accuracy_ci95.0`: a claim's value."""
    value: Any = claim
    for part in path.split("."):
        try:
            if isinstance(value, Mapping):
                value = value[part]
            elif isinstance(value, tuple):
                value = value[int(part)]
            else:
                value = getattr(value, part)
        except (KeyError, AttributeError, IndexError, ValueError):
            raise ClaimError(f"claim {claim.id!r} has no value {path!r}") from None
    if value is None:
        raise ClaimError(f"claim {claim.id!r} has no value {path!r}")
    return value


def span_text(claim: Claim, path: str, digits: int | None = None) -> str:
    """The text an inline span shows for a claim's value (`digits` decimals, else the unit's default)."""
    value = value_of(claim, path)
    if isinstance(value, str):
        return value
    last = path.rsplit(".", 1)[-1]
    if last.startswith("flops_reduction"):
        return reduction(value, 1 if digits is None else digits)
    unit = _unit(path)
    if unit == "n" and digits is None:
        digits = 0 if isinstance(value, int) else 1
    if last in ("accuracy", "baseline_accuracy") and digits is None:
        digits = 2
    return UNITS[unit](value, DEFAULT_DIGITS[unit] if digits is None else digits)


# -- tables ---------------------------------------------------------------------------------------------
def images_text(claim: Claim) -> str:
    """'9,000 (test 1000-9999), not chosen on' — how many images, which, and whether they chose the claim (a
    confirmed search's images that stopped its back-off chose when it ended)."""
    if claim.images is None:
        return "-"
    if claim.held_out:
        chosen = "not chosen on"
    elif claim.values.get("backoffs"):
        chosen = "its back-off stopped on them"
    else:
        chosen = "chosen on them"
    return f"{claim.images:,} ({claim.images_which}), {chosen}"


def accuracy_cell(claim: Claim) -> str:
    if claim.accuracy is None:
        return "-"
    low, high = claim.accuracy_ci95 or (None, None)
    interval = f" [{100 * low:.1f}-{100 * high:.1f}]" if low is not None else ""
    return f"{pct(claim.accuracy, 2)}{interval}"


def _config_cell(claim: Claim) -> str:
    return f"`{claim.config}`" if claim.config else "-"


def _storage_cell(claim: Claim) -> str:
    if claim.storage_bytes is None:
        return "-"
    base = f" ({claim.baseline_storage_bytes / 1e6:.1f})" if claim.baseline_storage_bytes else ""
    return f"{claim.storage_bytes / 1e6:.1f}{base}"


def _speed_cell(claim: Claim) -> str:
    entry = claim.latency.get("pytorch-b64")
    return "-" if entry is None else f"{times(entry.speedup)} ({entry.threads} threads)"


COLUMNS: dict[str, tuple[str, Callable[[Claim], str]]] = {
    "claim": ("claim", lambda c: f"`{c.id}`"),
    "title": ("configuration", lambda c: c.title),
    "model": ("model / dataset", lambda c: f"{c.model} / {c.dataset}"),
    "accuracy": ("accuracy [95% CI]", accuracy_cell),
    "images": ("images (which), chosen on them?", images_text),
    "baseline": ("exact", lambda c: pct(c.baseline_accuracy, 2)),
    "retention": ("retention", lambda c: pct(c.retention)),
    "paper": ("FLOP reduction, paper conv. (encoding free)", lambda c: reduction(c.flops_reduction_paper)),
    "paper_both": ("FLOP reduction, paper conv. (encoding free; the paper's)",
                   lambda c: f"{reduction(c.flops_reduction_paper)} ({pct(c.paper_reduction)})"),
    "full": ("FLOP reduction, full conv. (encoding counted)", lambda c: reduction(c.flops_reduction_full)),
    "storage": ("storage MB (exact)", _storage_cell),
    "config": ("configuration file", _config_cell),
    "speed": ("measured speed-up, PyTorch eager, batch 64", _speed_cell),
}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def claims_table(claims: Iterable[Claim], columns: tuple[str, ...]) -> str:
    chosen = [COLUMNS[name] for name in columns]
    return markdown_table([title for title, _ in chosen], [[cell(c) for _, cell in chosen] for c in claims])


def _group(claims: Mapping[str, Claim], group: str) -> list[Claim]:
    return [c for c in claims.values() if c.group == group]


ACCURACY_COLUMNS = ("claim", "title", "accuracy", "images", "retention", "paper", "full")


def _accuracy_group(group: str, columns: tuple[str, ...] = ACCURACY_COLUMNS) -> Callable[[Mapping[str, Claim]], str]:
    return lambda claims: claims_table([c for c in _group(claims, group) if c.kind == "accuracy"], columns)


def _speed_rows(claims: Iterable[Claim]) -> str:
    rows = []
    for c in claims:
        for entry in c.latency.values():
            rows.append([f"`{c.id}`", c.title, entry.runtime, str(entry.batch), str(entry.threads),
                         f"{entry.exact_ms:.2f}", f"{entry.tabled_ms:.2f}", times(entry.speedup)])
    return markdown_table(["claim", "configuration", "runtime", "batch", "threads", "exact ms", "tabled ms",
                           "speed-up (exact / tabled)"], rows)


def _values_table(claims: Iterable[Claim], columns: list[tuple[str, str]], first: str = "claim") -> str:
    """Rows of claims, columns of their `values` (name, heading)."""
    rows = [[f"`{c.id}`", c.title, *[span_text(c, f"values.{key}") if key in c.values else "-"
                                      for key, _ in columns]] for c in claims]
    return markdown_table([first, "what", *[heading for _, heading in columns]], rows)


def _headline(claims: Mapping[str, Claim]) -> str:
    rows = [c for c in claims.values() if "headline" in c.values.get("tags", ())]
    return claims_table(rows, ("claim", "model", "title", "accuracy", "images", "retention", "paper", "full",
                               "speed"))


def _baselines(claims: Mapping[str, Claim]) -> str:
    """One row per checkpoint: how it was trained and its exact accuracy on the whole test split, where measured."""
    rows: dict[str, list[str]] = {}
    for c in claims.values():
        if c.checkpoint_sha256 and c.baseline_accuracy is not None and c.images_which:
            row = rows.setdefault(c.checkpoint_sha256, [f"{c.model} / {c.dataset}", f"`{c.checkpoint_sha256[:12]}…`",
                                                        f"`{c.checkpoint_from}`", "-", f"`{c.id}`"])
            if c.images_which.startswith("test 0-") and row[3] == "-":
                row[3] = f"{pct(c.baseline_accuracy, 2)} ({c.images_which})"
    return markdown_table(["model / dataset", "weights sha256", "trained by", "exact accuracy (images)",
                           "first claim"], list(rows.values()))


def _speed_group(group: str) -> Callable[[Mapping[str, Claim]], str]:
    return lambda claims: _speed_rows(_group(claims, group))


def _values_group(group: str, columns: list[tuple[str, str]]) -> Callable[[Mapping[str, Claim]], str]:
    return lambda claims: _values_table(_group(claims, group), columns)


CLASSROOM = [("toggle_p50_s", "toggle p50"), ("toggle_p95_s", "toggle p95"), ("ck_p50_s", "C/K p50"),
             ("ck_p95_s", "C/K p95"), ("search_p95_s", "search p95"), ("masking_p95_s", "masking p95"),
             ("open_p95_s", "opening p95"), ("queue_p95_s", "queue wait p95 (all)"), ("toggles", "toggles"),
             ("errors", "errors"), ("sessions_matching", "sessions matching a fresh evaluation"),
             ("peak_rss_gb", "server peak RSS")]
USER_MODELS = [("open_s", "open: decode, trace, exact baseline"), ("exact_eval_s", "exact evaluation"),
               ("build_s", "table build, all layers"), ("all_table_eval_s", "all-table evaluation"),
               ("first_metrics_s", "first metrics"), ("toggle_s", "late-layer toggle"),
               ("peak_rss_gb", "peak memory"), ("macs", "MACs (= FlopCounterMode's)"),
               ("paper_flops_exact", "FLOPs exact"), ("paper_flops_all_table", "FLOPs all-table, paper conv."),
               ("full_flops_all_table", "FLOPs all-table, full conv.")]
KERNELS = [("rows", "rows"), ("codebooks", "C"), ("outputs", "M"), ("native_ms", "native ms"),
           ("exact_ms", "exact ms"), ("lookups_per_cycle", "lookups per cycle"), ("of_limit_pct", "of 32")]
INTERACTIVE = [("floor_s", "one exact forward"), ("toggle_s", "toggle"), ("layer_rebuild_s", "one layer's K"),
               ("cold_build_s", "cold build"), ("warm_start_s", "warm start")]

TABLES: dict[str, Callable[[Mapping[str, Claim]], str]] = {
    "headline": _headline,
    "baselines": _baselines,
    "reproduction": _accuracy_group("reproduction", ("claim", "model", "title", "accuracy", "images", "baseline",
                                                     "retention", "paper_both", "full", "config")),
    "learned": _accuracy_group("learned", ACCURACY_COLUMNS + ("storage",)),
    "learned-cifar10": _accuracy_group("learned-cifar10", ACCURACY_COLUMNS + ("storage",)),
    "paper-k1024": _accuracy_group("paper-k1024", ACCURACY_COLUMNS + ("storage", "config")),
    "every-layer-ft": _accuracy_group("every-layer-ft", ("claim", "model", "title", "accuracy", "images", "baseline",
                                                         "retention", "paper", "full", "config")),
    "cifar10-target": _accuracy_group("cifar10-target", ACCURACY_COLUMNS + ("config",)),
    "cifar10-target-speed": _speed_group("cifar10-target"),
    "fast": _accuracy_group("fast", ACCURACY_COLUMNS + ("config",)),
    "native-accuracy": _accuracy_group("native", ACCURACY_COLUMNS + ("config",)),
    "native-speed": _speed_group("native"),
    "fast-speed": _speed_group("fast"),
    "torch-speed": _speed_group("torch-speed"),
    "latency-searches": _accuracy_group("latency-searches", ACCURACY_COLUMNS + ("config",)),
    "kernels": _values_group("kernels", KERNELS),
    "user-models": _values_group("user-models", USER_MODELS),
    "classroom-browser": _values_group("classroom-browser", CLASSROOM),
    "classroom-websocket": _values_group("classroom-websocket", CLASSROOM),
    "interactive": _values_group("interactive", INTERACTIVE),
}


# -- documents ------------------------------------------------------------------------------------------
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)
SPAN = re.compile(r"(<!--c:([\w.-]+?)\.([\w.-]+?)(?::(\d))?-->)(.*?)(<!--/c-->)", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    """The files whose generated parts the registry owns: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render_text(text: str, claims: Mapping[str, Claim], where: str = "") -> str:
    """`text` with every generated block and inline span filled from the registry."""
    def block(match: re.Match[str]) -> str:
        name = match[2]
        if name not in TABLES:
            raise ClaimError(f"{where}: unknown generated table {name!r} (known: {', '.join(TABLES)})")
        return f"{match[1]}{TABLES[name](claims)}\n{match[4]}"

    def span(match: re.Match[str]) -> str:
        claim = get(claims, match[2])
        return f"{match[1]}{span_text(claim, match[3], None if match[4] is None else int(match[4]))}{match[6]}"

    return SPAN.sub(span, BLOCK.sub(block, text))


def strip_generated(text: str) -> str:
    """`text` without its generated blocks and spans: what is written by hand."""
    return SPAN.sub("", BLOCK.sub("", text))


def render(claims: Mapping[str, Claim], root: Path = ROOT) -> list[Path]:
    """Rewrite the generated parts of every document; returns the files that changed."""
    changed = []
    for path in documents(root):
        text = path.read_text()
        new = render_text(text, claims, str(path.relative_to(root)))
        if new != text:
            atomic_write_text(path, new)
            changed.append(path)
    return changed


# -- reproduce ------------------------------------------------------------------------------------------
def default_checkpoint(claim: Claim) -> Path:
    from tabconv import zoo

    return zoo.checkpoint_path(claim.model, claim.dataset)


def check_checkpoint(claim: Claim, path: Path) -> None:
    """The checkpoint must be the claim's: a different one is a one-line error saying where the claim's comes from."""
    from tabconv.train import load_checkpoint

    if not path.is_file():
        raise ClaimError(f"{path}: no such checkpoint; claim {claim.id}'s comes from `{claim.checkpoint_from}` "
                         "(pass --checkpoint PATH)")
    _, meta = load_checkpoint(path)
    if meta.get("sha256") != claim.checkpoint_sha256:
        raise ClaimError(f"{path}: weights sha256 {str(meta.get('sha256'))[:12]}… are not claim {claim.id}'s "
                         f"{claim.checkpoint_sha256[:12]}…; that checkpoint comes from `{claim.checkpoint_from}`")


def reproduce(claim: Claim, checkpoint: Path, *, root: Path = ROOT, data_root: str | None = None,
              cache_dir: str | None = None, progress: Progress | None = None, retarget: bool = False
              ) -> dict[str, Any]:
    """Re-run a claim's evaluation in-process (as `evaluate --config … --eval-skip N` does) and compare.

    The claim's own checkpoint must reproduce its accuracy exactly. With `retarget`, another checkpoint of the same
    architecture (one trained anew: training is not bit-for-bit repeatable across machines) gets the configuration's
    tables rebuilt from it; it cannot give the same number, so the verdict is whether the recorded accuracy lies
    within the measured one's 95% interval."""
    from tabconv.cache import TableCache
    from tabconv.config import load as load_config
    from tabconv.metrics import Origin
    from tabconv.session import Session

    if not claim.rerunnable:
        raise ClaimError(f"claim {claim.id} ({claim.kind}) has no configuration to re-run; its numbers come from "
                         f"{claim.source}" + (f", made by `{claim.command}`" if claim.command else ""))
    config_path = root / claim.config
    config = load_config(config_path)
    if retarget and config.tables_file:
        raise ClaimError(f"claim {claim.id} holds fine-tuned tables, which are not rebuilt for another checkpoint; "
                         f"fine-tune its parent on yours as its command does: `{claim.command}`")
    if not retarget:
        check_checkpoint(claim, checkpoint)
    session = Session.from_checkpoint(str(checkpoint), calibration=config.calibration, eval_images=claim.images,
                                      data_root=data_root, cache=TableCache(cache_dir), progress=progress,
                                      eval_skip=claim.first_image)
    loaded, tables = session.load_configuration(str(config_path), retarget=retarget)
    metrics = session.apply(loaded, progress=progress, origin=Origin.EDIT if tables is None else Origin.IMPORTED,
                            tables=tables).metrics
    difference = metrics.accuracy - claim.accuracy
    low, high = metrics.accuracy_ci95
    same = metrics.eval_images == claim.images
    return {"claim": claim.id, "config": claim.config, "images_which": claim.images_which,
            "recorded_images": claim.images, "measured_images": metrics.eval_images,
            "recorded_accuracy": claim.accuracy, "measured_accuracy": metrics.accuracy, "difference": difference,
            "retargeted": retarget, "measured_ci95": [low, high],
            "match": same and (low <= claim.accuracy <= high if retarget else abs(difference) <= TOLERANCE)}


def reproduce_lines(result: dict[str, Any]) -> list[str]:
    retargeted = result.get("retargeted")
    verdict = (("consistent" if result["match"] else "DIFFERS") + " (retargeted to another checkpoint)" if retargeted
               else "reproduced" if result["match"] else "DIFFERS")
    low, high = result["measured_ci95"]
    interval = f", 95% CI {low:.2%}-{high:.2%}" if retargeted else ""
    return [f"claim {result['claim']} ({result['config']}, {result['images_which']}): {verdict}",
            f"recorded {result['recorded_accuracy']:.4%} on {result['recorded_images']:,} images, measured "
            f"{result['measured_accuracy']:.4%} on {result['measured_images']:,}{interval} (difference "
            f"{100 * result['difference']:+.4f} points)"]


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("claim", help="a claim id of docs/claims.json")
    p.add_argument("--checkpoint", default=None, help="the claim's checkpoint (default: checkpoints/MODEL-DATASET.pt)")
    p.add_argument("--data-root", default=None, help="dataset root (else $TABCONV_DATA, else the user cache)")
    p.add_argument("--cache-dir", default=None, help="table cache (else $TABCONV_CACHE, else cached_tables/)")
    p.add_argument("--registry", default=str(REGISTRY), help="the registry file (default: docs/claims.json)")
    p.add_argument("--retarget", action="store_true",
                   help="the checkpoint is another one of the claim's architecture (e.g. trained anew with the "
                   "claim's checkpoint_from): rebuild the tables from it and check the recorded accuracy lies in the "
                   "measured one's 95%% interval")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_reproduce(args: argparse.Namespace) -> None:
    """`python -m tabconv reproduce CLAIM`: prints the comparison; a mismatch is an error (exit status 2)."""
    registry = Path(args.registry)
    claim = get(load(registry), args.claim)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(claim)
    result = reproduce(claim, checkpoint, root=registry.resolve().parents[1], data_root=args.data_root,
                       cache_dir=args.cache_dir, retarget=args.retarget)
    print(json.dumps(result, indent=2) if args.json else "\n".join(reproduce_lines(result)))
    if not result["match"]:
        how = "outside the measured 95% interval" if args.retarget else "not reproduced"
        raise ClaimError(f"claim {claim.id} {how}: {result['measured_accuracy']:.6f} on "
                         f"{result['measured_images']} images against {claim.accuracy:.6f} on {claim.images}")


def main(argv: list[str] | None = None) -> int:
    """`python -m tabconv.registry render | check`: rewrite, or check, the documents' generated parts."""
    parser = argparse.ArgumentParser(prog="python -m tabconv.registry", description=main.__doc__)
    parser.add_argument("action", choices=("render", "check"))
    args = parser.parse_args(argv)
    try:
        claims = load()
        if args.action == "render":
            changed = render(claims)
            print(f"{len(claims)} claims; rewrote {', '.join(str(p.relative_to(ROOT)) for p in changed) or 'nothing'}")
            return 0
        stale = [p for p in documents() if render_text(p.read_text(), claims, p.name) != p.read_text()]
        print("stale: " + ", ".join(p.name for p in stale) if stale else f"{len(claims)} claims; documents current")
        return 1 if stale else 0
    except ClaimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
