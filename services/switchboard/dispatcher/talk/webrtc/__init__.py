"""Talk over WebRTC: a browser's peer connection bridged into a Talk session."""
