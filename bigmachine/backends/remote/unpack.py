"""Run on a host by the driver (python -c): unpack one bundle into the cache.

Usage: unpack.py CACHE NAME MODE [EXTENSION...] with the bundle's tar.gz on
stdin; it lands in <cache>/bundles/<name>. For the bigmachine bundle (MODE
"check" or "build") it then imports the extensions, and builds them with
Cython when they are missing or do not load.
"""
import io, os, shutil, subprocess, sys, tarfile, tempfile
cache, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
exts = sys.argv[4:]
bundles = os.path.join(cache, "bundles")
final = os.path.join(bundles, name)
data = sys.stdin.buffer.read()
if os.path.isdir(final):
    sys.exit(0)
os.makedirs(bundles, exist_ok=True)
tag = os.path.join(cache, "CACHEDIR.TAG")
if not os.path.exists(tag):
    with open(tag, "w") as f:
        f.write("Signature: 8a477f597d28d172789f06886806bc55\n"
                "# bigmachine's code bundles; see https://bford.info/cachedir/\n")
stage = tempfile.mkdtemp(prefix=".stage-", dir=bundles)
CHECK = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)"
BUILD = ("import os, sys\nfrom setuptools import Extension, setup\nfrom Cython.Build import cythonize\n"
         "setup(script_args=['build_ext', '--inplace', '--parallel', str(os.cpu_count() or 1)], "
         "ext_modules=cythonize("
         "[Extension(n, [n.replace('.', '/') + '.pyx'], extra_compile_args=['-O2']) "
         "for n in sys.argv[1:]], compiler_directives={'language_level': '3'}, quiet=True))")
def run(code, args):
    env = dict(os.environ, PYTHONPATH=stage, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code] + args, cwd=stage, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name.split("/"):
                sys.exit("bigmachine: refusing bundle member %r" % m.name)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(stage, filter="data")
        else:
            tar.extractall(stage)
    if mode != "plain":
        check = run(CHECK, exts) if mode == "check" else None
        if check is None or check.returncode != 0:
            if check is not None:
                sys.stderr.write("bigmachine: the driver's compiled extensions do not load here; "
                                 "building them with Cython\n")
            built = run(BUILD, exts)
            if built.returncode != 0:
                tail = built.stdout.decode("utf-8", "replace").strip().splitlines()[-15:]
                sys.stderr.write("bigmachine: cannot build bigmachine's Cython extensions with %s "
                                 "(it needs Cython, setuptools and a C compiler):\n%s\n"
                                 % (sys.executable, "\n".join(tail)))
                sys.exit(3)
            shutil.rmtree(os.path.join(stage, "build"), ignore_errors=True)
            check = run(CHECK, exts)
            if check.returncode != 0:
                tail = check.stdout.decode("utf-8", "replace").strip().splitlines()[-15:]
                sys.stderr.write("bigmachine: the extensions built here do not load:\n%s\n"
                                 % "\n".join(tail))
                sys.exit(3)
    os.chmod(stage, 0o755)
    try:
        os.rename(stage, final)
    except OSError:
        if not os.path.isdir(final):  # else another driver won the race with the same content
            raise
finally:
    shutil.rmtree(stage, ignore_errors=True)
