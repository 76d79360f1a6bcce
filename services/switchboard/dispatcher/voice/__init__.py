"""Speech in runs: a run that speaks its answer (``speaker.py``) and the port
to the speech engines (``ports.py``). Voice sessions (Talk) are ``dispatcher/talk``."""
