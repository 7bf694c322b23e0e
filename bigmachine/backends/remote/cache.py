"""Run on a host by the driver (python -c SCRIPT REQUEST): bigmachine's cache there.

The cache (default ~/.cache/bigmachine) holds content-addressed entries,
``bundles/<hash>`` (code and wheels) and ``envs/<hash>`` (virtual
environments), and ``run/`` (machines' run dirs). Its directories are 0700,
its files 0600. Nothing in it is trusted before two checks:

- every component of the cache's path is owned by this user or root and is
  not writable by group or others (a root-owned sticky directory such as
  /tmp excepted), as sshd's StrictModes checks a home directory; the cache's
  own directories are not symlinks;
- every file of an entry matches the entry's manifest (sha256, no file added
  or missing, no symlink but those a venv makes), and a bundle's shipped
  files hash to its name.

A cache that fails the first is refused, as is a bundle that fails the
second; a venv that fails it is rebuilt. Old entries are pruned, never one
a running machine holds (it keeps a shared flock on each entry it uses).

REQUEST is JSON: {"cache": DIR, "ops": [OP, ...]}, answered by one JSON line
(a list of results); a refusal is exit status 3 with the reason on stderr.
  {"op": "check", "entries": ["bundles/H", ...]}     -> {"missing": [...]}
  {"op": "install", "entry": "bundles/H", "salt": S, "build": "plain"|"check"|"build",
   "exts": [...]}  with the bundle's tar.gz on stdin  -> {}
  {"op": "env", "entry": "envs/H", "wheels": "bundles/W", "pip": "bundles/P",
   "args": [...]}                                      -> {"python", "path", "rebuilt", "seconds"}
  {"op": "prune", "keep": N, "max_age": SECONDS, "using": [...]} -> {"removed": [...]}
Every request runs under an exclusive flock on <cache>/.lock.
"""
import fcntl, hashlib, io, json, os, shutil, stat, subprocess, sys, sysconfig, tarfile, tempfile
import time

MANIFEST = ".bigmachine-manifest.json"
UID = os.getuid()


class Refused(Exception):
    pass


def check_path(cache):
    """Refuse a cache that anyone but this user (or root) could change; make its
    missing parents (0700, under parents already checked)."""
    if os.pathsep in cache:
        raise Refused("the cache %s has %r in its path, which would split the machines' "
                      "PYTHONPATH: choose another cache_dir" % (cache, os.pathsep))
    parts = os.path.realpath(os.path.dirname(cache)).split(os.sep)
    for i in range(1, len(parts) + 1):
        path = os.sep.join(parts[:i]) or os.sep
        if not os.path.lexists(path):  # a fresh account's ~/.cache, say
            own_dir(path)
            continue
        st = os.stat(path)
        if st.st_uid not in (0, UID):
            raise Refused("%s is owned by uid %d, not by you or root: another user could "
                          "replace the cache %s" % (path, st.st_uid, cache))
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise Refused("%s is writable by its group or others (mode %o): they could replace "
                          "the cache %s; chmod go-w %s" % (path, stat.S_IMODE(st.st_mode), cache,
                                                           path))
    for sub in ("", "bundles", "envs", "run"):
        own_dir(os.path.join(cache, sub))


def own_dir(path, create=True):
    """path is a real directory of ours that nobody else can write: make it 0700."""
    if create and not os.path.lexists(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise Refused("%s is a symlink; the cache's directories must be real ones: "
                      "remove it" % path)
    if not stat.S_ISDIR(st.st_mode):
        raise Refused("%s is not a directory: remove it" % path)
    if st.st_uid != UID:
        raise Refused("%s is owned by uid %d, not by you: remove it" % (path, st.st_uid))
    if st.st_mode & 0o022:
        raise Refused("%s is writable by its group or others (mode %o): someone else may have "
                      "changed what is in it; remove it" % (path, stat.S_IMODE(st.st_mode)))
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan(root):
    """{relpath: sha256 or "link:TARGET"} of the files under root, all ours and private."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = "link:" + os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                own_dir(path, create=False)
            elif not stat.S_ISREG(st.st_mode):
                raise Refused("%s is not a regular file" % path)
            elif st.st_uid != UID or st.st_mode & 0o022:
                raise Refused("%s is not yours alone (uid %d, mode %o)"
                              % (path, st.st_uid, stat.S_IMODE(st.st_mode)))
            elif rel != MANIFEST:
                found[rel] = sha256(path)
    return found


def bundle_hash(salt, files):
    """The name of a bundle: Bundle.hash of the driver's _bundle.py, from file hashes."""
    digest = hashlib.sha256(salt.encode() + b"\0")
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + bytes.fromhex(files[rel]))
    return digest.hexdigest()


def write_manifest(root, manifest):
    path = os.path.join(root, MANIFEST)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, sort_keys=True)
    os.rename(path + ".tmp", path)


def verify(cache, entry):
    """None when entry is sound; else why not. Refused if it is not a real dir of ours."""
    root = os.path.join(cache, entry)
    own_dir(root, create=False)
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return "it has no manifest"
    files = scan(root)
    listed = dict(manifest["shipped"], **manifest["built"])
    for rel in sorted(set(files) | set(listed)):
        link = files.get(rel, "").startswith("link:") and not listed.get(rel, "").startswith(
            "link:")
        if link:
            return "%s is a symlink where a file or directory was installed" % rel
        if rel not in listed:
            return "%s is not in its manifest (a file was added after it was installed)" % rel
        if rel not in files:
            return "%s is missing" % rel
        if files[rel] != listed[rel]:
            return "%s differs from its manifest" % rel
    if entry.startswith("bundles/") and bundle_hash(manifest["salt"], manifest["shipped"]) \
            != os.path.basename(entry):
        return "its files do not hash to its name"
    return None


def refuse(cache, entry, why):
    raise Refused("refusing the cached %s: %s. Something other than bigmachine changed it: "
                  "remove it (the next start makes it again) and check who can write to %s"
                  % (os.path.join(cache, entry), why, cache))


def touch(cache, entry):
    os.utime(os.path.join(cache, entry, MANIFEST))


def remove(cache, entry):
    """Remove entry unless a machine holds it (a shared flock); False if one does."""
    root = os.path.join(cache, entry)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        trash = tempfile.mkdtemp(prefix=".trash-", dir=os.path.dirname(root))
        os.rename(root, os.path.join(trash, "entry"))
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def op_check(cache, req):
    missing = []
    for entry in req["entries"]:
        if not os.path.lexists(os.path.join(cache, entry)):
            missing.append(entry)
            continue
        why = verify(cache, entry)
        if why == "it has no manifest":  # made by an older bigmachine: make it again
            if not remove(cache, entry):
                refuse(cache, entry, why + ", and a machine is using it")
            missing.append(entry)
        elif why is not None:
            refuse(cache, entry, why)
        else:
            touch(cache, entry)
    return {"missing": missing}


# Each must load as an extension: a compiled .py module whose extension is
# missing (or built for another Python) would import from its source instead.
CHECK = ("import importlib, importlib.machinery, sys\n"
         "for n in sys.argv[1:]:\n"
         "    f = importlib.import_module(n).__file__ or ''\n"
         "    if not f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):\n"
         "        sys.exit(n + ' is not compiled here: it loads from ' + f)\n")
# The .pyx modules, and the .py modules a .pxd declares, as setup.py builds them.
BUILD = ("import os, sys\nfrom setuptools import Extension, setup\nfrom Cython.Build import cythonize\n"
         "src = lambda n: n.replace('.', '/') + ('.pyx' if os.path.exists(n.replace('.', '/') + '.pyx') else '.py')\n"
         "setup(script_args=['build_ext', '--inplace', '--parallel', str(os.cpu_count() or 1)], "
         "ext_modules=cythonize("
         "[Extension(n, [src(n)], extra_compile_args=['-O2']) for n in sys.argv[1:]], "
         "compiler_directives={'language_level': '3', 'annotation_typing': False}, quiet=True))")


def run(argv, cwd, **env):
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
               PYTHONDONTWRITEBYTECODE="1", **env)
    return subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def tail(done, lines=15):
    return "\n".join(done.stdout.decode("utf-8", "replace").strip().splitlines()[-lines:])


def build_extensions(stage, req):
    """Import the bigmachine bundle's extensions; build them with Cython if they do not load."""
    exts = req["exts"]
    check = run([sys.executable, "-c", CHECK] + exts, stage, PYTHONPATH=stage) \
        if req["build"] == "check" else None
    if check is not None and check.returncode == 0:
        return
    if check is not None:
        sys.stderr.write("bigmachine: the driver's compiled extensions do not load here; "
                         "building them with Cython\n")
    built = run([sys.executable, "-c", BUILD] + exts, stage, PYTHONPATH=stage)
    if built.returncode != 0:
        raise Refused("cannot build bigmachine's Cython extensions with %s (it needs Cython, "
                      "setuptools and a C compiler):\n%s" % (sys.executable, tail(built)))
    shutil.rmtree(os.path.join(stage, "build"), ignore_errors=True)
    check = run([sys.executable, "-c", CHECK] + exts, stage, PYTHONPATH=stage)
    if check.returncode != 0:
        raise Refused("the extensions built here do not load:\n%s" % tail(check))


def op_install(cache, req):
    entry = req["entry"]
    final = os.path.join(cache, entry)
    data = sys.stdin.buffer.read()
    if os.path.lexists(final):
        return {}
    stage = tempfile.mkdtemp(prefix=".stage-", dir=os.path.dirname(final))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar.getmembers():
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") \
                        or ".." in m.name.split("/"):
                    raise Refused("refusing bundle member %r" % m.name)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(stage, filter="data")
            else:
                tar.extractall(stage)
        shipped = scan(stage)
        if bundle_hash(req["salt"], shipped) != os.path.basename(entry):
            raise Refused("the bundle for %s arrived damaged: its files do not hash to its "
                          "name" % entry)
        if req["build"] != "plain":
            build_extensions(stage, req)
        files = scan(stage)
        built = dict((rel, h) for rel, h in files.items() if rel not in shipped)
        write_manifest(stage, {"salt": req["salt"], "shipped": shipped, "built": built})
        os.rename(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {}


def site_dirs():
    """This Python's sys.path less the standard library: what an env reaches through."""
    paths = sysconfig.get_paths()
    std = set(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib"))
    std.add(os.path.join(os.path.realpath(paths["platstdlib"]), "lib-dynload"))
    return [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) not in std]


def op_env(cache, req):
    entry = req["entry"]
    root = os.path.join(cache, entry)
    python = os.path.join(root, "bin", "python")
    rebuilt = None
    started = time.monotonic()
    if os.path.lexists(root):
        rebuilt = verify(cache, entry)
        if rebuilt is None:
            touch(cache, entry)
        elif not remove(cache, entry):
            refuse(cache, entry, rebuilt + ", and a machine is using it")
    if rebuilt is not None or not os.path.lexists(root):
        make_env(cache, req, root, python)
    probe = run([python, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"], root)
    return {"python": python, "path": json.loads(probe.stdout), "rebuilt": rebuilt,
            "seconds": time.monotonic() - started}


def make_env(cache, req, root, python):
    made = run([sys.executable, "-m", "venv", "--without-pip", root], cache)
    if made.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise Refused("%s cannot make a virtual environment (python -m venv failed); install "
                      "its venv module (on Debian and Ubuntu: apt install python3-venv):\n%s"
                      % (sys.executable, tail(made)))
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    with open(os.path.join(site.stdout.decode().strip(), "_bigmachine_host.pth"), "w") as f:
        for path in site_dirs():  # the host's own packages, after the env's
            f.write("import site; site.addsitedir(%r)\n" % path)
    wheels = os.path.join(cache, req["wheels"])
    # Only the shipped wheels: none of the host's pip configuration (its files and
    # PIP_* variables could add find-links, and the env would hold other packages).
    pip = run([python, "-m", "pip", "install", "--isolated", "--no-index", "--find-links", wheels,
               "--no-cache-dir", "--disable-pip-version-check", "--no-input",
               "--no-warn-script-location"] + req["args"], wheels,
              PYTHONPATH=os.path.join(cache, req["pip"]), PIP_CONFIG_FILE=os.devnull)
    if pip.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise Refused("cannot install the packages into %s:\n%s" % (root, tail(pip, 30)))
    write_manifest(root, {"salt": "", "shipped": {}, "built": scan(root)})


def op_prune(cache, req):
    """Remove entries past the `keep` most recently used of their kind, or unused for
    max_age seconds; never one in `using`, nor one a machine holds; and run dirs
    unchanged for max_age that no machine holds."""
    removed = []
    now = time.time()
    for kind in ("bundles", "envs"):
        base = os.path.join(cache, kind)
        entries = []
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            if name.startswith("."):  # a stage or trash left by a crash
                if now - os.lstat(path).st_mtime > 3600:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                used = os.stat(os.path.join(path, MANIFEST)).st_mtime
            except OSError:
                used = os.lstat(path).st_mtime
            entries.append((used, kind + "/" + name))
        entries.sort(reverse=True)
        for i, (used, entry) in enumerate(entries):
            if entry in req["using"] or (i < req["keep"] and now - used <= req["max_age"]):
                continue
            if remove(cache, entry):
                removed.append(entry)
    removed += prune_runs(cache, now - req["max_age"])
    return {"removed": removed}


def prune_runs(cache, before):
    """Remove machines' run dirs (cwd and TMPDIR) last changed before `before` that no
    machine holds (a driver that died leaves them), and launch dirs left empty."""
    removed = []
    runs = os.path.join(cache, "run")
    for launch in os.listdir(runs):
        base = os.path.join(runs, launch)
        if launch.startswith(".") or not stat.S_ISDIR(os.lstat(base).st_mode):
            continue
        for name in os.listdir(base):
            entry = "run/%s/%s" % (launch, name)
            st = os.lstat(os.path.join(cache, entry))
            if name.startswith(".") or not stat.S_ISDIR(st.st_mode) or st.st_mtime > before:
                continue
            if remove(cache, entry):
                removed.append(entry)
        try:
            os.rmdir(base)  # only if no machine of that launch is left
        except OSError:
            pass
    return removed


OPS = {"check": op_check, "install": op_install, "env": op_env, "prune": op_prune}


def main():
    request = json.loads(sys.argv[1])
    os.umask(0o077)
    cache = os.path.abspath(os.path.expanduser(request["cache"]))
    try:
        check_path(cache)
        fd = os.open(os.path.join(cache, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        check_path(cache)  # again: it may have changed while we waited
        results = [OPS[op["op"]](cache, op) for op in request["ops"]]
    except Refused as exc:
        sys.stderr.write("bigmachine: %s\n" % exc)
        sys.exit(3)
    sys.stdout.write(json.dumps(results) + "\n")


main()
