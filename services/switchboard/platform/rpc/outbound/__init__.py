"""Calls out of this process: channels to experts, calls to another Switchboard service,
and a status from one back into our error."""
