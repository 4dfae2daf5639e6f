"""The HTTP gateway's configuration, validated at construction."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

API_KEY_ENV = "PDSERVE_API_KEY"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname, or a wildcard such as 0.0.0.0: reachable from other hosts


@dataclass(frozen=True)
class HttpConfig:
    """Where and how the router serves HTTP. ValueError says which option to change.

    ``port`` 0 binds a free port (the gateway reports the one it got). ``api_key`` is checked
    as ``Authorization: Bearer KEY`` on every route but /health and /metrics; binding a
    non-loopback host requires one. ``served_model_name``: the ``model`` clients pass (default:
    the model directory's name). ``chat_template``: a Jinja file that overrides the model's.
    ``read_timeout_s``: how long a client may take to send a request's headers (from connecting
    or from the request's first byte; then the connection is closed) and then its body (then
    408), so that clients that trickle bytes cannot hold connections and handlers forever.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("--host must be a host name or address")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be an integer in [0, 65535] (0: any free port), got {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("--api-key must be a non-empty string")
        if self.api_key is None and not is_loopback_host(self.host):
            raise ValueError(f"--host {self.host} is reachable from other hosts; pass --api-key "
                             f"(or set ${API_KEY_ENV}), or bind 127.0.0.1")
        if self.served_model_name is not None and not (isinstance(self.served_model_name, str)
                                                       and self.served_model_name.strip()):
            raise ValueError("--served-model-name must be a non-empty string")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ValueError(f"--chat-template {self.chat_template} is not a file")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if not isinstance(self.read_timeout_s, (int, float)) or not self.read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be a positive number of seconds, got {self.read_timeout_s!r}")

    def url(self, port: int | None = None) -> str:
        """The base URL clients use (``port``: the bound one, when 0 was asked for)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}"


def add_http_arguments(parser) -> None:
    """--host, --port, --no-http, --api-key, --served-model-name, --chat-template."""
    group = parser.add_argument_group("HTTP (OpenAI-compatible API and /metrics)")
    group.add_argument("--host", default="127.0.0.1", help="HTTP bind address (another than "
                       "loopback needs --api-key)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (0: any free port)")
    group.add_argument("--no-http", action="store_true", help="serve only the ZMQ client endpoint")
    group.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' "
                       f"(default: ${API_KEY_ENV})")
    group.add_argument("--served-model-name", default=None, help="the model name clients pass "
                       "(default: the model directory's name)")
    group.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja chat template overriding the model's")


def http_config_from_args(args) -> HttpConfig | None:
    """The HttpConfig the parsed arguments ask for; None with --no-http. Raises ValueError."""
    if args.no_http:
        return None
    return HttpConfig(host=args.host, port=args.port,
                      api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                      served_model_name=args.served_model_name, chat_template=args.chat_template)


def http_argv(config: HttpConfig | None) -> list[str]:
    """Command-line flags for a ``pdserve router`` subprocess (the API key goes by environment)."""
    if config is None:
        return ["--no-http"]
    argv = ["--host", config.host, "--port", str(config.port)]
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    if config.chat_template:
        argv += ["--chat-template", config.chat_template]
    return argv
