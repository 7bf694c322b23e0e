#!/bin/sh
# bigmachine: the user-data of an EC2 instance, made by its driver.
#
# It holds no cluster secret and no long-lived key: only a one-time TLS key
# for the agent below and the sha256 of a one-time token. The agent accepts
# its driver once (the first to send that token, before boot_timeout), then
# nothing more; it powers the instance off when its machines are done, or at
# boot_timeout if no driver came. Nothing here dials out.
umask 077
dir=/var/lib/bigmachine
mkdir -p /var/lib
if ! mkdir "$dir"; then
    echo "bigmachine: $dir exists: an agent ran here before; powering off" >&2
    poweroff || shutdown -h now || halt -p
    exit 1
fi
ulimit -n 1048576 2>/dev/null || ulimit -n 65536 2>/dev/null || true
cat >"$dir/setup.sh" <<'BIGMACHINE_SETUP'
@SETUP@
BIGMACHINE_SETUP
cat >"$dir/agent.py" <<'BIGMACHINE_AGENT'
@AGENT@
BIGMACHINE_AGENT
setsid @PYTHON@ "$dir/agent.py" "$dir" >"$dir/agent.log" 2>&1 <<'BIGMACHINE_CONFIG' &
@CONFIG@
BIGMACHINE_CONFIG
