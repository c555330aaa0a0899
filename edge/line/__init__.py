"""Line stage: the running station. Config, frame sources, the pipeline threads, payloads, the store
and outbox, MQTT publishing, plant protocols (plc/), the local API and the runtime that wires them.

Owns nothing itself; its modules each say what they own and must not touch.
"""
