package container

import (
	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
)

// State is a container's lifecycle state (the API's enum).
type State = cmlv1.ContainerState

// The states.
const (
	Stopped  = cmlv1.ContainerState_STOPPED
	Starting = cmlv1.ContainerState_STARTING
	Running  = cmlv1.ContainerState_RUNNING
	Freezing = cmlv1.ContainerState_FREEZING
	Frozen   = cmlv1.ContainerState_FROZEN
	Stopping = cmlv1.ContainerState_STOPPING
	Failed   = cmlv1.ContainerState_FAILED
)

// transitions is the container state machine: the states each state may
// move to. Every change of a container's state goes through update, which
// refuses anything not listed here. Exits (to Stopped, or Failed when the
// release after an exit failed) are allowed from every state a run can be
// in, because init may die at any moment.
var transitions = map[State][]State{
	Stopped:  {Starting},
	Failed:   {Starting},
	Starting: {Running, Failed, Stopped},
	Running:  {Freezing, Stopping, Stopped, Failed},
	Freezing: {Frozen, Running, Stopped, Failed},
	Frozen:   {Running, Stopping, Stopped, Failed},
	Stopping: {Stopped, Failed},
}

// allowed reports whether the state machine permits from -> to.
func allowed(from, to State) bool {
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// hasRun reports whether a container in state s has (or is getting)
// runtime state: a run generation that an exit can end.
func hasRun(s State) bool {
	switch s {
	case Starting, Running, Freezing, Frozen, Stopping:
		return true
	}
	return false
}

// update moves c to state to with reason, if c still is in run generation
// gen, has not been removed, and the state machine allows the move. It is
// the only writer of c.state: a writer that learned of c before a newer
// fact (init exited, another start began, the container was removed) finds
// its update refused instead of overwriting that fact. gen 0 matches any
// generation (used by operations that begin a run). It publishes the change
// and reports whether it was made.
func (m *Manager) update(c *Container, gen uint64, to State, reason string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.updateLocked(c, gen, to, reason)
}

func (m *Manager) updateLocked(c *Container, gen uint64, to State, reason string) bool {
	if c.removed || (gen != 0 && c.gen != gen) || !allowed(c.state, to) {
		return false
	}
	c.state, c.reason = to, audit.Bound(reason, audit.MaxReason)
	m.publishLocked(c)
	return true
}
