"""The HTTP server on top of :class:`nbengine.Engine`: OpenAI-compatible and SGLang-native endpoints.

From a notebook, on an engine you already loaded::

    from nbengine.server import serve
    server = serve(llm, port=30000, api_key="sk-...")   # background thread, returns at once
    # OpenAI(base_url=server.url + "/v1", api_key="sk-...")
    server.stop()

From the shell: ``nbengine serve --model M --port 30000``. The engine never imports this package.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = 'pip install "nbengine[server]"'
_DEPS = ("fastapi", "uvicorn", "prometheus_client")


def require_server_deps() -> None:
    """Raise ImportError naming the install command when the server's dependencies are missing."""
    missing = []
    for name in _DEPS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a None entry in sys.modules: treated as missing
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ImportError(f"nbengine's server needs {', '.join(missing)}, which is not installed. "
                          f"Install the server extra with:\n\n    {INSTALL_HINT}\n")


def __getattr__(name: str):
    if name in ("serve", "ServerHandle"):
        require_server_deps()
        from . import background

        return getattr(background, name)
    if name == "create_app":
        require_server_deps()
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)


__all__ = ["serve", "ServerHandle", "create_app", "ServerSettings", "require_server_deps", "INSTALL_HINT"]
