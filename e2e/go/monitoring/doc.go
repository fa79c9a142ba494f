// Package monitoring pins the Prometheus Operator API types whose CRDs the e2e suite
// generates with controller-gen.
package monitoring

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
