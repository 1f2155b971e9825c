"""The fleet: workers on Docker hosts and a control service, coordinated over MQTT.

Pure modules (no IO, no clock reads; ``now`` is always passed in):

- ``topics``   — topic names and their parsing
- ``protocol`` — versioned message schemas and their validation
- ``jobs``     — the job state machine, a transition table
- ``migrate``  — the migrate workflow, a state machine over child jobs

The one IO module is ``mqtt``, the aiomqtt adapter that translates its errors.
"""
