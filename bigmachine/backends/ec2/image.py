"""The default image (ami=None): the latest Amazon Linux 2023 of the instance type's
architecture, from AWS Systems Manager's public parameters, and the setup that gives
it the driver's Python.

AL2023's own python3 is 3.9; its other Pythons are dnf packages (python3.11, ...),
so the default setup installs the driver's major.minor from dnf and numpy and
cloudpickle (the driver's versions) with pip: both need the instance to reach
package repositories. The agent runs on the image's own /usr/bin/python3, which
is there before setup.
"""
from __future__ import annotations

import importlib.metadata
import logging
import sys
from typing import Any, Optional, Sequence

from ...errors import Error
from .aws import AWSError, explain

log = logging.getLogger("bigmachine.ec2")

PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
ARCHITECTURES = ("x86_64", "arm64")  # those AL2023 has images for, in our order of choice
AGENT_PYTHON = ("/usr/bin/python3",)  # the image's own, there before setup runs
# The driver's major.minor -> the AL2023 package that provides python3.N.
PACKAGES = {(3, 9): "python3", (3, 11): "python3.11", (3, 12): "python3.12",
            (3, 13): "python3.13"}
DRIVER = sys.version_info[:2]
NEEDED = ("numpy", "cloudpickle")  # what a machine imports beyond the stdlib


def latest(ssm: Any, instance_type: str, architectures: Sequence[str]) -> str:
    """The id of the latest AL2023 image for the first of architectures it has one for."""
    arch = next((a for a in ARCHITECTURES if a in architectures), None)
    if arch is None:
        raise AWSError("InvalidParameterValue",
                       f"instance_type={instance_type!r} runs {', '.join(architectures)}, for "
                       "which Amazon Linux 2023 has no image: pass ami= an image id")
    name = PARAMETER.format(arch=arch)
    try:
        ami = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except Exception as exc:
        err = explain(exc, f"look up the default image (ssm:GetParameter {name})")
        raise AWSError(err.code, f"{err}; or pass ami= an image id") from exc
    log.info("ami=None: using %s, the latest Amazon Linux 2023 for %s (%s)", ami, arch,
             instance_type)
    return ami


def python_setup(setup: Optional[str]) -> tuple[str, str]:
    """The driver's Python on AL2023: its command, and setup that installs it (with
    numpy and cloudpickle) before setup; an Error before anything launches when
    AL2023 has no package of it."""
    package = PACKAGES.get(DRIVER)
    version = "%d.%d" % DRIVER
    if package is None:
        raise Error(f"ami=None picks Amazon Linux 2023, which has no Python {version} (the "
                    f"driver's; it has {', '.join('%d.%d' % v for v in PACKAGES)}): pass "
                    f"ami= an image with Python {version}, numpy and cloudpickle, and python= "
                    "its command (or setup= that installs them)")
    python = f"python{version}"
    pins = " ".join(f"{name}=={importlib.metadata.version(name)}" for name in NEEDED)
    script = (f"# bigmachine (ami=None): the driver's Python {version}, numpy, cloudpickle\n"
              f"dnf install -y {package} {package}-pip || exit\n"
              f"{python} -m pip install --no-cache-dir {pins} || exit\n")
    return python, script + (setup or "")
