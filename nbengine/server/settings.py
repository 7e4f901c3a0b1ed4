"""ServerSettings: what a server exposes and how it guards it (one object for the CLI and ``serve``)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass
class ServerSettings:
    """Settings of one server. Secure by default: loopback only, no CORS, bodies capped, prompts unlogged."""

    host: str = "127.0.0.1"
    port: int = 30000  # 0 picks a free port
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"
    served_model_name: str | None = None  # default: the model path as given, or the default model's name
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_prompts: bool = False  # log prompt text (at INFO) — off unless asked
    access_log: bool = True
    allow_image_urls: bool = False  # fetch http(s) image URLs of chat image parts (outbound requests): off unless asked
    graceful_shutdown_s: float = 5.0  # open streams get this long to finish on stop, then are aborted

    def __post_init__(self) -> None:
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0 = any free port), got {self.port}.")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}.")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; pass None to serve without a key.")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s}.")
