"""Phone calls over SIP (docs/telephony.md): PJSIP's user agent, and each call a Talk session."""
