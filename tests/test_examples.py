"""The examples run on bm.Local() with small sizes, and their figures are checked.

pi runs as a user would (python -m); the others through main(argv), which
returns the figures it printed.
"""
import argparse
import re
import subprocess
import sys

import pytest

import bigmachine as bm
from bigmachine.examples import add_system_arguments, kvstore, parameter_server, shuffle, system_from


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


@pytest.mark.timeout(120)
def test_kvstore_survives_a_machine_stopped_mid_run(capsys):
    result = kvstore.main(["--machines", "3", "--keys", "2000", "--inflight", "16"])
    # main raises unless every copy on every machine equals the client's dict.
    assert result.keys == 2000 and result.machines == 3
    assert result.stopped == "m1" and result.replacement == "m3"
    assert result.lost_calls > 0  # calls did meet the stopped machine and went elsewhere
    # The replacement holds shard 1 and the copy of shard 0.
    assert result.rebuilt_keys == sum(kvstore.shard_of(f"key{i}", 3) in (0, 1) for i in range(2000))
    assert result.puts_per_second > 0
    assert "every copy matches the client's dict" in capsys.readouterr().out


def test_kvstore_needs_two_machines(capsys):
    with pytest.raises(SystemExit) as stopped:
        kvstore.main(["--machines", "1"])
    assert stopped.value.code == 2
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_shuffle_sorts_like_np_sort(capsys):
    # main raises unless the result equals np.sort of the same data.
    result = shuffle.main(["--machines", "3", "--elements", "300001"])
    assert result.elements == 300001
    # Each machine keeps about a third of its partition and sends the rest.
    assert 0.5 * 300001 * 8 < result.exchanged_bytes < 0.8 * 300001 * 8
    assert result.exchange_gbps > 0 and result.single_seconds > 0
    out = capsys.readouterr().out
    assert "the results are equal" in out and "GB/s" in out


@pytest.mark.timeout(120)
def test_shuffle_on_one_machine_exchanges_nothing(capsys):
    result = shuffle.main(["--machines", "1", "--elements", "1000"])
    assert result.exchanged_bytes == 0


@pytest.mark.timeout(120)
def test_parameter_server_drops_the_straggler_and_cancels_the_rest(capsys):
    result = parameter_server.main(["--workers", "2", "--features", "20", "--item-timeout", "1"])
    training = result.training
    assert training.dropped == [0]  # the straggler, by the item timeout
    assert training.loss < parameter_server.TARGET_LOSS
    assert training.steps > 0
    # Every worker's generator saw its caller give up: the timeout or the cancel.
    assert result.endings == ["cancelled", "cancelled"]
    assert result.error < 0.05  # against np.linalg.lstsq on the same data
    assert "dropped by the 1 s item timeout: workers [0]" in capsys.readouterr().out


def test_examples_reject_hosts_without_ssh(capsys):
    with pytest.raises(SystemExit) as stopped:
        shuffle.main(["--hosts", "a,b"])
    assert stopped.value.code == 2
    assert "--hosts needs --system ssh" in capsys.readouterr().err


def test_examples_build_an_ssh_system_from_their_options():
    parser = argparse.ArgumentParser()
    add_system_arguments(parser)
    args = parser.parse_args(["--system", "ssh", "--hosts", "a,b:2222",
                              "--machines-per-host", "2"])
    system = system_from(parser, args)
    assert isinstance(system, bm.SSH)
    assert system.machines_per_host == 2 and not system.accept_new_hosts
    assert repr(system) == "SSH(hosts=['a', 'b:2222'])"
