"""The demo of the README runs, prints its estimate, and rejects bad options."""
import re
import subprocess
import sys


def test_pi_demo_estimates_pi():
    done = subprocess.run(
        [sys.executable, "-m", "bigmachine.examples.pi", "--machines", "2", "--samples", "4000000"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = re.search(r"pi ≈ ([0-9.]+) .* from 4,000,000 samples on 2 machines in ([0-9.]+) s",
                      done.stdout)
    assert found, done.stdout
    assert abs(float(found.group(1)) - 3.14159) < 0.01
    assert "samples (" in done.stderr  # the progress display


def test_pi_demo_rejects_bad_options():
    done = subprocess.run([sys.executable, "-m", "bigmachine.examples.pi", "--machines", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "must be positive" in done.stderr
