"""Our PPO: maths, rollout container, and the stage loop."""
