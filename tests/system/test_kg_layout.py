"""The knowledge-graph package's shape: one class under every import path, its public API, and
parts small enough to read (issue 13: no class over ~400 lines)."""

import ast
import inspect
import pathlib

import moe_framework
from moe_framework import kg as kg_package
from moe_framework import knowledge_graph

_PUBLIC_API = {
    "add_edge",
    "add_edges_batch",
    "add_node",
    "add_nodes_batch",
    "add_or_update_batch",
    "add_or_update_node",
    "backup",
    "checkpoint",
    "close",
    "create",
    "device_bank",
    "draw",
    "edges",
    "find_similar_nodes",
    "get_node",
    "get_provenance",
    "iter_nodes",
    "k_hop",
    "list_checkpoints",
    "neighbors",
    "node_ids",
    "num_edges",
    "open",
    "record_provenance",
    "record_provenance_batch",
    "search",
    "shortest_path",
    "to_graphml",
    "to_json",
}


def test_knowledge_graph_names_are_the_same_objects_under_every_import_path():
    for name in knowledge_graph.__all__:
        assert getattr(knowledge_graph, name) is getattr(kg_package, name), name
    assert moe_framework.KnowledgeGraph is kg_package.KnowledgeGraph
    assert moe_framework.KnowledgeGraphError is kg_package.KnowledgeGraphError
    assert set(knowledge_graph.__all__) == {
        "KnowledgeGraph",
        "KnowledgeGraphError",
        "StoreLockedError",
        "Node",
        "SimilarNode",
        "Neighbor",
        "FilingResult",
    }


def test_knowledge_graph_public_api_is_complete_and_documented():
    cls = kg_package.KnowledgeGraph
    public = {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}
    assert public == _PUBLIC_API
    undocumented = [n for n in sorted(_PUBLIC_API) if not inspect.getdoc(getattr(cls, n))]
    assert not undocumented


def test_no_class_in_the_knowledge_graph_package_exceeds_400_lines():
    root = pathlib.Path(kg_package.__file__).parent
    files = sorted(root.glob("*.py")) + [pathlib.Path(knowledge_graph.__file__)]
    too_long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 400:
                    too_long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not too_long
