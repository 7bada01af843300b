"""Settings, read from the environment (and a `.env` file in the repo root). See SPEC §2."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from dotenv import load_dotenv

from aimind.env import database_from_url, env_bool, env_choice, env_float, env_int, env_path, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env", override=False)

DATA_DIR = env_path("AIMIND_DATA_DIR", "./data")
# The database, the cluster token, the Redis address (with its password), the admin's first password: only ours.
DATA_DIR.mkdir(parents=True, exist_ok=True)
if DATA_DIR.stat().st_uid == os.getuid():
    DATA_DIR.chmod(0o700)
CACHE_DIR = env_path("AIMIND_CACHE_DIR", "~/.cache/aimind")
HOST = env_str("AIMIND_HOST", "127.0.0.1")
PORT = env_int("AIMIND_PORT", 8000, minimum=1, maximum=65535)
SERVER_URL = env_str("AIMIND_SERVER_URL", "").rstrip("/")
WORKER_NAME = env_str("AIMIND_WORKER_NAME", socket.gethostname())
WORKER_IP = env_str("AIMIND_WORKER_IP", "")
REDIS_URL = env_str("REDIS_URL", "")

# Cluster timings; tests shorten them through the environment, never by sleeping for minutes.
HEARTBEAT_INTERVAL = env_float("AIMIND_HEARTBEAT_INTERVAL", 5.0, minimum=0.1)
WORKER_STALE_AFTER = env_float("AIMIND_WORKER_STALE_AFTER", 60.0, minimum=1.0)
HEALTH_CHECK_INTERVAL = env_float("AIMIND_HEALTH_CHECK_INTERVAL", 1.0, minimum=0.1)
BACKEND_START_TIMEOUT = env_float("AIMIND_BACKEND_START_TIMEOUT", 600.0, minimum=1.0)
# Restarts after an error: at once, then base, 2×base, 4×base … capped; the count resets after a long clean run.
RESTART_BACKOFF_BASE = env_float("AIMIND_RESTART_BACKOFF_BASE", 10.0, minimum=0.0)
RESTART_BACKOFF_MAX = env_float("AIMIND_RESTART_BACKOFF_MAX", 300.0, minimum=0.0)
RESTART_RESET_AFTER = env_float("AIMIND_RESTART_RESET_AFTER", 600.0, minimum=1.0)
# Bounds on what one request may ask for (each answers 4xx naming the field when exceeded).
MAX_REPLICAS = env_int("AIMIND_MAX_REPLICAS", 64, minimum=1, maximum=100000)  # per model
MAX_INSTANCES = env_int("AIMIND_MAX_INSTANCES", 1024, minimum=1, maximum=1000000)  # in the whole cluster
MAX_REQUEST_BYTES = env_int("AIMIND_MAX_REQUEST_BYTES", 32 * 1024**2, minimum=1024)  # bodies and uploads: 413 above
MAX_ANONYMOUS_REQUEST_BYTES = 64 * 1024  # a request that carries no credential at all (the sign-in form)
# The web server's processes (uvicorn --workers); each holds the gateway's tables in memory.
WEB_WORKERS = env_int("AIMIND_WEB_WORKERS", 1, minimum=1, maximum=64)
# The gateway's keys and routes live in memory: how often each web process asks Redis whether they changed, and
# reloads them in any case; how often usage counts and keys' last use are written.
GATEWAY_REFRESH_INTERVAL = env_float("AIMIND_GATEWAY_REFRESH_INTERVAL", 0.25, minimum=0.01)
GATEWAY_RELOAD_EVERY = env_float("AIMIND_GATEWAY_RELOAD_EVERY", 10.0, minimum=0.1)
GATEWAY_USAGE_FLUSH_INTERVAL = env_float("AIMIND_GATEWAY_USAGE_FLUSH_INTERVAL", 10.0, minimum=0.1)
# What `up`/`server` print: their children's lines at or above this level (every line goes to <data dir>/logs/).
LOG_LEVEL = env_choice("AIMIND_LOG_LEVEL", "WARNING", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
# The bearer token Prometheus presents to /metrics; unset, /metrics answers 404.
METRICS_TOKEN = os.environ.get("AIMIND_METRICS_TOKEN", "")
# A replica whose connections fail this many times in a row is passed over until its health check passes again.
GATEWAY_REPLICA_FAILURES = env_int("AIMIND_GATEWAY_REPLICA_FAILURES", 3, minimum=1, maximum=1000)
# Models that sleep when idle (`sleep_after_minutes`): how often the beat looks for idle ones; how long a request for a
# sleeping model waits for a replica to run (then 503 `model_waking` with Retry-After).
SLEEP_CHECK_INTERVAL = env_float("AIMIND_SLEEP_CHECK_INTERVAL", 15.0, minimum=0.1)
GATEWAY_WAKE_TIMEOUT = env_float("AIMIND_GATEWAY_WAKE_TIMEOUT", 120.0, minimum=0.0)
# When an instance cannot be placed for lack of memory, put idle models that sleep (no request for EVICT_IDLE_AFTER
# seconds) to sleep, least recently used first, until it fits. Off unless asked for.
EVICT_IDLE_MODELS = env_bool("AIMIND_EVICT_IDLE_MODELS", False)
EVICT_IDLE_AFTER = env_float("AIMIND_EVICT_IDLE_AFTER", 60.0, minimum=0.0)
# Model env may not set the dynamic loader's or Python's start-up variables (code would run inside the backend).
ALLOW_LOADER_ENV = env_bool("AIMIND_ALLOW_LOADER_ENV", False)
# An instance analysing, scheduled or preparing with no progress for this long is placed again (its scheduler was
# killed, its launch lost, its worker died mid-install); workers note their downloads and installs alive.
STUCK_AFTER = env_float("AIMIND_STUCK_AFTER", 300.0, minimum=5.0)
# Several servers: the beat holding the leader lock sends the periodic tasks; another takes over this long after the
# holder dies. The server's own health probe of a silent worker's backends waits at most this long per backend.
BEAT_LOCK_TTL = env_float("AIMIND_BEAT_LOCK_TTL", 15.0, minimum=1.0)
BACKEND_PROBE_TIMEOUT = env_float("AIMIND_BACKEND_PROBE_TIMEOUT", 2.0, minimum=0.1)
EVENT_RETENTION_DAYS = env_float("AIMIND_EVENT_RETENTION_DAYS", 14.0, minimum=0.01)
# Each start of an instance's backend keeps its own log: the last this many per instance (the current one included).
INSTANCE_LOG_ATTEMPTS = env_int("AIMIND_INSTANCE_LOG_ATTEMPTS", 5, minimum=1, maximum=100)
# Per-minute samples of the gateway's use and of workers' load (the dashboard): kept this long.
SAMPLE_RETENTION_HOURS = env_float("AIMIND_SAMPLE_RETENTION_HOURS", 48.0, minimum=1.0)
BACKEND_PORT_RANGE = (env_int("AIMIND_BACKEND_PORT_MIN", 40000, minimum=1024, maximum=65535),
                      env_int("AIMIND_BACKEND_PORT_MAX", 41000, minimum=1024, maximum=65535))

SECRET_KEY_FILE = DATA_DIR / "secret_key"
DEBUG = env_bool("AIMIND_DEBUG", False)
ALLOWED_HOSTS = ["*"]  # the product is reached by IP from other nodes; auth guards every route


def _secret_key() -> str:
    from django.core.management.utils import get_random_secret_key

    explicit = env_str("AIMIND_SECRET_KEY", "")
    if explicit:
        return explicit
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if not SECRET_KEY_FILE.exists():
        SECRET_KEY_FILE.write_text(get_random_secret_key())
        SECRET_KEY_FILE.chmod(0o600)
    return SECRET_KEY_FILE.read_text().strip()


SECRET_KEY = _secret_key()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "django_celery_beat",
    "channels",
    "aimind",
    "models_app.apps.ModelsConfig",
    "workers_app.apps.WorkersConfig",
    "scheduler_app",
    "gateway_app.apps.GatewayConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "aimind.urls"
# Audio for /v1/audio/transcriptions arrives whole (OpenAI accepts files up to 25 MB); Django's 2.5 MB is too small.
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
ASGI_APPLICATION = "aimind.asgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


DATABASES = {"default": database_from_url(env_str("DATABASE_URL", ""), sqlite_path=DATA_DIR / "db.sqlite3")}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Writers take the lock when a transaction begins, so concurrent placements serialise instead of racing.
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    # WAL: the web, scheduler and worker processes read while one writes; NORMAL sync is safe under WAL.
    DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
# A worker node (`manage.py worker`) talks to the server's API only: it gets no database at all, so it needs no
# credentials for one, and a query from its code fails loudly (ImproperlyConfigured) instead of working by accident.
WORKER_NODE = len(sys.argv) > 1 and sys.argv[1] == "worker" and Path(sys.argv[0]).name == "manage.py"
if WORKER_NODE:
    DATABASES = {"default": {"ENGINE": "django.db.backends.dummy"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = []
# English and Simplified Chinese (the product's guide is Chinese): the browser's Accept-Language picks, the switch on
# every page (/i18n/setlang/) overrides and is remembered in a cookie. Catalogues: locale/, compiled by `make setup`.
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "gateway_app.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["gateway_app.authentication.AdminWithPermissions"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "models_app.pagination.HeaderPagination",
    "DEFAULT_PARSER_CLASSES": ["aimind.parsers.BoundedJSONParser", "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {"TITLE": "aiMindServe API", "VERSION": "1", "SERVE_INCLUDE_SCHEMA": False,
                        "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAdminUser"]}  # the schema maps every door

# Celery: the scheduler consumes "scheduler"; each worker consumes its own "worker.<name>".
# Without REDIS_URL (management commands, tests) nothing may reach a Redis we did not start: in-memory broker.
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "scheduler"
CELERY_TASK_ROUTES = {"scheduler_app.tasks.*": {"queue": "scheduler"}}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# django-celery-beat's scheduler behind a leader lock in Redis: every server runs a beat, one at a time sends.
CELERY_BEAT_SCHEDULER = "aimind.beat:LeaderScheduler"
CELERY_BEAT_SCHEDULE = {
    "mark-stale-workers": {"task": "workers_app.tasks.mark_stale_workers",
                           "schedule": min(10.0, WORKER_STALE_AFTER / 3),
                           "options": {"queue": "scheduler", "expires": 10}},
    "schedule-pending-instances": {"task": "scheduler_app.tasks.schedule_pending_instances", "schedule": 15.0,
                                   "options": {"queue": "scheduler", "expires": 15}},
    "sweep-stuck-instances": {"task": "scheduler_app.tasks.sweep_stuck_instances",
                              "schedule": min(30.0, STUCK_AFTER / 3), "options": {"queue": "scheduler", "expires": 30}},
    "prune-instance-events": {"task": "scheduler_app.tasks.prune_instance_events", "schedule": 3600.0,
                              "options": {"queue": "scheduler", "expires": 3600}},
    "sleep-idle-models": {"task": "scheduler_app.tasks.sleep_idle_models", "schedule": SLEEP_CHECK_INTERVAL,
                          "options": {"queue": "scheduler", "expires": SLEEP_CHECK_INTERVAL}},
}

CHANNEL_LAYERS = {
    "default": (
        {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
        if REDIS_URL else {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    )
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    # Every process logs INFO (DEBUG when asked) to its output, which `up` files; AIMIND_LOG_LEVEL filters the console.
    "root": {"handlers": ["console"], "level": "DEBUG" if LOG_LEVEL == "DEBUG" else "INFO"},
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}
