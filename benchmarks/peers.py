"""Peers measured in the same suite run, when their Debian packages are present: nginx with `proxy_pass`, and nginx
with a Lua rate limiter that counts in Redis — the architecture of Kong's rate-limiting plugin with its redis
policy (a fixed window: INCRBY and EXPIRE pipelined on one pooled connection per request, failing open when Redis
cannot be reached). Both run one worker process, like the Failgate and reference proxy they are compared with, and `wrk`
(when present) cross-checks the generator's request rates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

MODULES = Path("/usr/lib/nginx/modules")

RESTY_REDIS = Path("/usr/share/lua/5.1/nginx/redis.lua")  # Debian's lua-nginx-redis (lua-resty-redis)

# A fixed window per client address in Redis, as Kong's rate-limiting plugin counts with its redis policy:
# INCRBY and EXPIRE pipelined on a pooled connection, failing open when Redis cannot be reached. With
# lua-resty-redis when Debian's lua-nginx-redis is installed; else the same two commands over a bare cosocket.
_RESTY_LIMITER = r"""
        access_by_lua_block {
            local redis = require "nginx.redis"
            local red = redis:new()
            red:set_timeout(50)
            local ok = red:connect("127.0.0.1", %(redis)d)
            if not ok then return end  -- fail open, as Kong's fault_tolerant default does
            local key = "rl:" .. ngx.var.remote_addr .. ":" .. math.floor(ngx.now() / 60)
            red:init_pipeline()
            red:incrby(key, 1)
            red:expire(key, 60)
            local results = red:commit_pipeline()
            red:set_keepalive(10000, 64)
            if results and tonumber(results[1]) and tonumber(results[1]) > 1000000000 then return ngx.exit(429) end
        }
"""
_LIMITER = r"""
        access_by_lua_block {
            local sock = ngx.socket.tcp()
            sock:settimeout(50)
            local ok = sock:connect("127.0.0.1", %(redis)d)
            if not ok then return end  -- fail open, as Kong's fault_tolerant default does
            local key = "rl:" .. ngx.var.remote_addr .. ":" .. math.floor(ngx.now() / 60)
            local n = #key
            sock:send("*2\r\n$4\r\nINCR\r\n$" .. n .. "\r\n" .. key .. "\r\n*3\r\n$6\r\nEXPIRE\r\n$" .. n ..
                      "\r\n" .. key .. "\r\n$2\r\n60\r\n")
            local count = sock:receive("*l")
            sock:receive("*l")
            sock:setkeepalive(10000, 64)
            if count and tonumber(string.sub(count, 2)) > 1000000000 then return ngx.exit(429) end
        }
"""


def nginx() -> str | None:
    """The nginx binary, when it and its Lua module (libnginx-mod-http-lua) are installed."""
    binary = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/usr/local/sbin"))
    if binary is None or not (MODULES / "ngx_http_lua_module.so").exists():
        return None
    return binary


def nginx_command(workdir: Path, port: int, upstream: int, redis: int) -> list[str]:
    """Write the config; the command that runs nginx in the foreground with it (one worker)."""
    conf = workdir / "nginx.conf"
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    lines = [f"load_module {MODULES / 'ndk_http_module.so'};"] if (MODULES / "ndk_http_module.so").exists() else []
    lines += [f"load_module {MODULES / 'ngx_http_lua_module.so'};", "worker_processes 1;", "daemon off;",
              f"pid {workdir / 'nginx.pid'};", f"error_log {workdir / 'nginx-error.log'} warn;",
              "events { worker_connections 4096; }"]
    proxy = ("proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection \"\";")
    limiter = _RESTY_LIMITER if RESTY_REDIS.exists() else _LIMITER
    package_path = f'lua_package_path "{RESTY_REDIS.parent.parent}/?.lua;;";' if RESTY_REDIS.exists() else ""
    http = f"""http {{
    access_log off;
    {package_path}
    client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
    upstream api {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /pass {{ {proxy} }}
        location /rl {{
{limiter % {"redis": redis}}
            {proxy}
        }}
    }}
}}
"""
    conf.write_text("\n".join(lines) + "\n" + http)
    binary = nginx()
    assert binary is not None
    return [binary, "-p", str(workdir), "-e", str(workdir / "nginx-startup.log"), "-c", str(conf)]


def worker_of(master: int) -> int:
    """nginx's worker process (the one that serves), a child of its master."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            return int(stat.parent.name)
    return master


def wrk_rps(url: str, concurrency: int, seconds: float) -> float | None:
    """Requests per second as `wrk` measures them (None when wrk is not installed or fails)."""
    binary = shutil.which("wrk")
    if binary is None:
        return None
    done = subprocess.run([binary, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", url],
                          capture_output=True, text=True, timeout=seconds + 30)
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    return float(found.group(1)) if found else None
