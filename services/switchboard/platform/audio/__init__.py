"""Audio for voice and transcription: PCM helpers and the OpenAI-compatible
audio endpoints (``/audio/transcriptions``, ``/audio/speech``)."""
