"""Phone calls as a resource (``Call``): their records, events and RPCs, whatever carries them."""
