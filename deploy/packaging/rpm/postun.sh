# keepalive-agent's %postun ($1: 0 on erase). An edited policy is kept as policy.toml.rpmsave
# (%config(noreplace)); the status state under /run/keepalive-agent goes.
if [ "$1" -eq 0 ]; then
	dropin=/usr/lib/systemd/system/keepalive-agent.service.d/before-systemd-253.conf
	rm -f "$dropin"
	rmdir "${dropin%/*}" 2>/dev/null || :
	rm -rf /run/keepalive-agent
	# cargo-generate-rpm packages files, not their directories: the package's own go once
	# empty (a policy.toml.rpmsave keeps /etc/keepalive-agent).
	rmdir /usr/share/doc/keepalive-agent/docs /usr/share/doc/keepalive-agent \
		/usr/share/keepalive-agent /etc/keepalive-agent 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
