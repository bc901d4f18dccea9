"""Old module path of :mod:`moe_framework.moe_layer` (the layer was once called the
"constellation"); kept so existing imports keep working."""

from .moe_layer import DraftReports, MoELayer, RoutingInfo, draft_reports

__all__ = ["DraftReports", "RoutingInfo", "MoELayer", "draft_reports"]
