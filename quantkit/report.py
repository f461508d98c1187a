"""The per-layer record every stage leaves, and its table."""
from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    name: str
    original_type: str
    new_type: str
    bits_w: int | None = None
    bits_a: int | None = None
    rule: str = ""
    kept_fp_reason: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.kept_fp_reason is None


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_info(info: dict) -> str:
    parts = []
    for k, v in info.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)) and len(v) > 6:
            v = f"[{len(v)} values]"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


@dataclass
class QuantReport:
    scheme: str = ""
    trace_method: str = ""
    trace_note: str | None = None
    stage: str = "prepared"  # prepared | calibrated | deployed
    records: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (deploy layer, BatchNorm) pairs that convert folded together (the BatchNorm became an Identity)
    folded: list[tuple[str, str]] = field(default_factory=list)
    #: bytes of the model's parameters outside every listed layer (norms, embeddings, tokens ...), kept FP
    other_bytes: int = 0
    #: bytes of the input model's BatchNorm parameters folded into the layer before them before quantization
    folded_bytes: int = 0

    def add(self, record: LayerRecord) -> None:
        self.records.append(record)

    def __getitem__(self, name: str) -> LayerRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.records if r.quantized]

    @property
    def kept_fp(self) -> list[LayerRecord]:
        return [r for r in self.records if not r.quantized]

    def size_before(self) -> int:
        return sum(r.bytes_before for r in self.records)

    def size_after(self) -> int:
        return sum(r.bytes_after for r in self.records)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "trace_method": self.trace_method, "trace_note": self.trace_note,
                "stage": self.stage, "notes": list(self.notes), "records": [asdict(r) for r in self.records]}

    def table(self) -> str:
        head = ["layer", "type", "->", "W", "A", "rule / kept-FP reason", "bytes before", "after", "details"]
        rows = []
        for r in self.records:
            rows.append([
                r.name, r.original_type, r.new_type if r.quantized else "(FP)",
                "-" if r.bits_w is None else str(r.bits_w), "-" if r.bits_a is None else str(r.bits_a),
                r.rule if r.quantized else (r.kept_fp_reason or ""),
                _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after), _fmt_info(r.info),
            ])
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        widths[5] = min(widths[5], 60)
        lines = [f"quantkit report: scheme={self.scheme} stage={self.stage} graph={self.trace_method}"]
        if self.trace_note:
            lines.append(f"  note: {self.trace_note}")
        lines += [f"  note: {n}" for n in self.notes]
        fmt = "  ".join("{:<%d}" % w for w in widths[:-1]) + "  {}"
        lines.append(fmt.format(*head))
        lines.append("  ".join("-" * w for w in widths[:-1]) + "  " + "-" * 7)
        for row in rows:  # a long reason wraps inside its column: every word of it is shown
            pieces = textwrap.wrap(row[5], widths[5], break_on_hyphens=False) or [""]
            lines.append(fmt.format(*row[:5], pieces[0], *row[6:]).rstrip())
            lines += [fmt.format(*([""] * 5), piece, *([""] * 3)).rstrip() for piece in pieces[1:]]
        b, a = self.size_before(), self.size_after()
        ratio = f" ({b / a:.1f}x smaller)" if a else ""
        lines.append(f"{len(self.quantized)} of {len(self.records)} candidate layers quantized; "
                     f"their parameters: {_fmt_bytes(b)} -> {_fmt_bytes(a)}{ratio}")
        total_b, total_a = b + self.other_bytes + self.folded_bytes, a + self.other_bytes
        folded = f"; {_fmt_bytes(self.folded_bytes)} of BatchNorms folded away" if self.folded_bytes else ""
        lines.append(f"every parameter of the model: {_fmt_bytes(total_b)} -> {_fmt_bytes(total_a)} (incl. "
                     f"{_fmt_bytes(self.other_bytes)} outside the listed layers: norms, embeddings and other parameters "
                     f"kept FP{folded})")
        return "\n".join(lines)

    __str__ = table
