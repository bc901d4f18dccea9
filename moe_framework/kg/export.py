"""Export a KnowledgeGraph: JSON, GraphML, and a PNG picture of a subgraph."""

from __future__ import annotations

import json
import os
import re
from typing import IO, Iterable, Optional
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from . import files
from . import schema as _s


def _atomic_write(path: str, write, binary: bool = False) -> None:
    """Write through a new temporary file in the same folder (mode 0o666 & ~umask), fsync, then
    rename: no half-written exports, and the file gets the permissions any other tool would give
    it."""
    final = os.path.abspath(path)
    folder = os.path.dirname(final)
    files.remove_stale_temps(folder, files.temp_pattern(re.escape(os.path.basename(final))))
    tmp = files.temp_path(final)
    try:
        fd = files.create_new(tmp)
        f: IO = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        files.done_with(tmp)


def to_json(kg, path: str, include_embeddings: bool = True) -> None:
    """``{"format", "schema_version", "dim", "nodes": [...], "edges": [...]}``. Embeddings are
    lists of float32 values written as shortest-repr decimals, which parse back bit-exactly."""

    def write(f):
        head = {"format": _s.FORMAT_NAME, "schema_version": _s.SCHEMA_VERSION, "dim": kg.dim}
        f.write(json.dumps(head)[:-1] + ', "nodes": [')
        for i, n in enumerate(kg.iter_nodes()):
            rec = {
                "id": n.id,
                "type": n.type,
                "metadata": n.metadata,
                "merge_count": n.merge_count,
                "created_at": n.created_at,
                "updated_at": n.updated_at,
            }
            if include_embeddings:
                rec["embedding"] = [float(v) for v in n.embedding]
            f.write(("," if i else "") + "\n" + json.dumps(rec, allow_nan=False))
        f.write('\n], "edges": [')
        for i, (src, dst, t, w) in enumerate(kg.edges()):
            rec = {"src": src, "dst": dst, "type": t, "weight": w}
            f.write(("," if i else "") + "\n" + json.dumps(rec, allow_nan=False))
        f.write("\n]}\n")

    _atomic_write(path, write)


_GRAPHML_TYPES = {bool: "boolean", int: "long", float: "double", str: "string"}

# Characters XML 1.0 cannot hold, not even as character references: C0 controls other than tab,
# newline and carriage return, lone surrogates, U+FFFE and U+FFFF.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(s: str) -> str:
    """``s`` with the characters XML cannot hold written as ``\\uXXXX`` escapes (inside the
    ``metadata`` JSON text these are standard JSON escapes, so it parses back exactly)."""
    return _XML_INVALID.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def _xml_text(s: str) -> str:
    # A literal carriage return would be read back as a newline (XML end-of-line handling).
    return escape(_xml_safe(s), {"\r": "&#13;"})


def to_graphml(kg, path: str) -> None:
    """GraphML (directed). Node attributes: ``type``, ``merge_count``, ``metadata`` (JSON text)
    and ``meta_<field>`` for every scalar metadata field whose type is the same on all nodes;
    edge attributes: ``type``, ``weight``. Embeddings are not exported (use to_json)."""
    nodes = list(kg.iter_nodes())
    field_type: dict = {}
    for n in nodes:
        for key, v in n.metadata.items():
            t = type(v) if type(v) in _GRAPHML_TYPES else None
            if key in field_type and field_type[key] != t:
                field_type[key] = None
            else:
                field_type.setdefault(key, t)
    fields = sorted(k for k, t in field_type.items() if t is not None)

    def write(f):
        f.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        f.write('<graphml xmlns="http://graphml.graphdrawing.org/xmlns">\n')
        keys = [
            ("n_type", "node", "type", "string"),
            ("n_merge_count", "node", "merge_count", "long"),
            ("n_metadata", "node", "metadata", "string"),
        ]
        keys += [
            (f"n_meta_{i}", "node", f"meta_{k}", _GRAPHML_TYPES[field_type[k]])
            for i, k in enumerate(fields)
        ]
        keys += [("e_type", "edge", "type", "string"), ("e_weight", "edge", "weight", "double")]
        for kid, dom, name, typ in keys:
            f.write(
                f'  <key id="{kid}" for="{dom}" attr.name={quoteattr(_xml_safe(name))} '
                f'attr.type="{typ}"/>\n'
            )
        f.write('  <graph id="G" edgedefault="directed">\n')
        for n in nodes:
            f.write(f'    <node id="n{n.id}">\n')
            f.write(f'      <data key="n_type">{_xml_text(n.type)}</data>\n')
            f.write(f'      <data key="n_merge_count">{n.merge_count}</data>\n')
            meta = json.dumps(n.metadata, sort_keys=True, allow_nan=False, ensure_ascii=False)
            f.write(f'      <data key="n_metadata">{_xml_text(meta)}</data>\n')
            for i, k in enumerate(fields):
                if k in n.metadata:
                    v = n.metadata[k]
                    text = ("true" if v else "false") if isinstance(v, bool) else str(v)
                    if isinstance(v, float):
                        text = repr(v)
                    f.write(f'      <data key="n_meta_{i}">{_xml_text(text)}</data>\n')
            f.write("    </node>\n")
        for j, (src, dst, t, w) in enumerate(kg.edges()):
            f.write(f'    <edge id="e{j}" source="n{src}" target="n{dst}">\n')
            f.write(f'      <data key="e_type">{_xml_text(t)}</data>\n')
            f.write(f'      <data key="e_weight">{w!r}</data>\n')
            f.write("    </edge>\n")
        f.write("  </graph>\n</graphml>\n")

    _atomic_write(path, write)


def draw(
    kg,
    path_png: str,
    nodes: Optional[Iterable[int]] = None,
    color_by: str = "expert",
    max_nodes: int = 300,
    title: Optional[str] = None,
) -> None:
    # Figure + Agg canvas directly: no pyplot global state, safe from any thread, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    if nodes is None:
        ids = kg.node_ids()[:max_nodes].tolist()
    else:
        ids = sorted({int(i) for i in nodes})
        if len(ids) > max_nodes:
            raise ValueError(f"KnowledgeGraph.draw: {len(ids)} nodes > max_nodes={max_nodes}")
    recs = [kg.get_node(i) for i in ids]
    fig = Figure(figsize=(8, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.set_title(title or f"knowledge graph: {len(ids)} nodes, coloured by {color_by!r}")
    if recs:
        emb = _s.normalize(np.stack([r.embedding for r in recs]))
        pos = _pca2(emb)
        where = {r.id: k for k, r in enumerate(recs)}
        segs, widths = [], []
        idset = set(ids)
        for src, dst, _, w in kg.edges():
            if src in idset and dst in idset:
                segs.append([pos[where[src]], pos[where[dst]]])
                widths.append(0.4 + 1.6 * min(1.0, abs(w)))
        if segs:
            ax.add_collection(LineCollection(segs, linewidths=widths, colors="0.6", zorder=1))
        labels = [r.metadata.get(color_by, "none") for r in recs]
        cats = sorted({str(v) for v in labels}, key=_natural)
        cmap = _colormap(len(cats))
        for ci, cat in enumerate(cats):
            sel = [k for k, v in enumerate(labels) if str(v) == cat]
            sizes = [30 + 12 * min(20, recs[k].merge_count) for k in sel]
            ax.scatter(
                pos[sel, 0],
                pos[sel, 1],
                s=sizes,
                color=cmap(ci),
                edgecolors="k",
                linewidths=0.4,
                label=f"{color_by}={cat}",
                zorder=2,
            )
        if len(cats) <= 20:
            ax.legend(loc="best", fontsize=7, frameon=False)
        ax.autoscale_view()
    _atomic_write(path_png, lambda f: fig.savefig(f, format="png"), binary=True)


def _pca2(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 1:
        return np.zeros((1, 2))
    c = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    pos = u[:, :2] * s[:2]
    if pos.shape[1] < 2:
        pos = np.concatenate([pos, np.zeros((pos.shape[0], 2 - pos.shape[1]))], 1)
    return pos


def _colormap(n: int):
    from matplotlib import colormaps

    return colormaps["tab20" if n > 10 else "tab10"]


def _natural(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)
