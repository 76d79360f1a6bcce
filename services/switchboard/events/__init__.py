"""The EventService: the replayable event log and subscriptions.

subscriptions.py  what a subscription may ask for, replay handing over to live
                  delivery, access held, quotas and limits
streams.py        Subscribe and Stream sessions: grants, quotas, command frames
history.py        ListEvents: the retained log, page by page
servicer.py       converts requests to those calls
"""
