import Testing
@testable import TENGraD
@Test func placeholder() {}
