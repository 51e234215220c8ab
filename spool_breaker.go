package trivialsecwebhook

// breakers is the state of the breakers of the routes s re-drives through.
func (s *scheduler) breakers() []breakerState { return nil }
