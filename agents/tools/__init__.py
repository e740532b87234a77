"""The agent's local tools: registry, schemas, shell, workspace files, patches, Python function tools."""

from agents.tools.registry import (
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    ToolResult,
    ToolSpecError,
    build_registry,
    clip,
    validate_tool_spec,
)

__all__ = [
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "ToolSpecError",
    "build_registry",
    "clip",
    "validate_tool_spec",
]
