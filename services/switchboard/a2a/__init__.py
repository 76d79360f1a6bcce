"""A2A (Agent2Agent, ``lf.a2a.v1.A2AService``) as another front door to the dispatcher."""
