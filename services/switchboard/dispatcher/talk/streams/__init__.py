"""Phone calls over carriers' media streams (docs/telephony.md): Twilio's and Telnyx's
WebSocket audio, each call a Talk session as a SIP call is."""
