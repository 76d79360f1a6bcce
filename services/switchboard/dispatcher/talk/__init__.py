"""Voice sessions (``DispatcherService.Talk``): audio turns in, transcripts,
run updates and speech out, resumable on any replica."""
