# keepalive-agent's %post ($1: 1 on installation, 2 or more on upgrade). The same steps as the
# .deb's postinst, with Fedora's and RHEL's convention for services (what %systemd_post and
# %systemd_postun_with_restart do): the distribution's presets decide whether it is enabled,
# and nothing is started on installation.
unit=keepalive-agent.service
dropin=/usr/lib/systemd/system/$unit.d/before-systemd-253.conf

# systemd before 253 (RHEL 9 has 252) does not know Type=notify-reload: the drop-in makes the
# unit Type=notify there.
systemd=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9][0-9]*\).*/\1/p')
if [ -n "$systemd" ] && [ "$systemd" -lt 253 ]; then
	mkdir -p "${dropin%/*}"
	ln -sfn /usr/share/keepalive-agent/before-systemd-253.conf "$dropin"
else
	rm -f "$dropin"
	rmdir "${dropin%/*}" 2>/dev/null || :
fi

if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
	systemctl --no-reload preset "$unit" >/dev/null 2>&1 || :
elif [ -d /run/systemd/system ]; then
	# An upgrade restarts a running agent; the new one takes over the old one's pinned links
	# (--persist): no gap.
	systemctl try-restart "$unit" >/dev/null 2>&1 || :
fi
