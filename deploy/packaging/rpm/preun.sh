# keepalive-agent's %preun ($1: 0 on erase, 1 or more on upgrade, which leaves the agent to
# %post's restart).
if [ "$1" -eq 0 ]; then
	systemctl --no-reload disable --now keepalive-agent.service >/dev/null 2>&1 || :
	# The unit stops with --persist: enforcement stays pinned when the agent ends. Erasing the
	# package removes it too.
	keepalive-agent detach ||
		echo "keepalive-agent: detach failed; enforcement may remain until 'keepalive-agent detach' or a reboot" >&2
fi
