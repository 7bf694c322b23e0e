"""Run on a host by the driver (python -c): what Python is this, and where is the cache?

Usage: probe.py CACHE_DIR MODULE... ; prints one JSON line. It must parse on
any Python, even 2.7, so that a wrong version is reported, not a SyntaxError.
"""
import json, os, platform, sys
out = {"version": list(sys.version_info[:3]), "executable": sys.executable,
       "machine": platform.machine(), "system": platform.system(),
       "ssh_connection": os.environ.get("SSH_CONNECTION", ""),
       "path": [p for p in sys.path if p], "packages": {}}
try:
    import sysconfig
    out["ext_suffix"] = sysconfig.get_config_var("EXT_SUFFIX") or ""
    out["soabi"] = sysconfig.get_config_var("SOABI") or ""
    out["implementation"] = sys.implementation.name
    out["libc"] = list(platform.libc_ver())
except Exception:
    out["ext_suffix"] = ""
def version(name):
    try:
        import importlib.util
        if importlib.util.find_spec(name) is None:
            return None
    except Exception:
        return None
    try:
        from importlib.metadata import version as v
        return v(name)
    except Exception:
        return "unknown"
for name in sys.argv[2:]:
    out["packages"][name] = version(name)
out["cache"] = os.path.abspath(os.path.expanduser(sys.argv[1]))
sys.stdout.write(json.dumps(out) + "\n")
